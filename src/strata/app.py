"""build_app(config): wire the layers together and own start-up and shutdown."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from strata import __version__
from strata.api import health_routes, openai_routes
from strata.api.errors import install_error_handlers
from strata.api.request_id import RequestIdMiddleware
from strata.api.state import AppState, Lifecycle
from strata.config import StrataConfig
from strata.serving.chat import ChatService
from strata.serving.router import Router, build_deployments

log = structlog.get_logger("strata.app")


def build_app(config: StrataConfig, lifecycle: Lifecycle | None = None) -> FastAPI:
    # Deployments are built here, not in the lifespan, so a missing model fails before we listen.
    router = Router(build_deployments(config), health_interval_s=config.server.health_interval_s)
    state = AppState(
        config=config,
        router=router,
        chat=ChatService(router),
        started_at=time.time(),
        lifecycle=lifecycle or Lifecycle(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        log.info("strata started", models=[info.model for info in router.infos()])
        try:
            yield
        finally:
            state.lifecycle.draining = True
            await router.stop(grace_s=10.0)
            log.info("strata stopped")

    app = FastAPI(title="Strata", version=__version__, lifespan=lifespan)
    app.state.strata = state
    app.include_router(health_routes.router)
    app.include_router(openai_routes.router)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    return app
