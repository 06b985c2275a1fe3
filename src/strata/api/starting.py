"""While Strata starts, it listens already: probes answer, every other request gets 503 with Retry-After.

uvicorn accepts connections only after the app's lifespan start-up returns, so the slow part of the start
(migrations, tool servers, the security layer) runs after it (`app.py`). Until it is done, the routes it
wires up cannot work; clients get a refusal they retry on (the `openai` SDK honours Retry-After) instead of
a refused connection or a 500, and /readyz says what is still loading.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from strata.api.auth import refuse
from strata.api.errors import ApiError
from strata.api.permissions import STARTUP_PROBES
from strata.api.state import Lifecycle

RETRY_AFTER_S = 1


class StartingGate:
    """Pure ASGI; once the start-up is done it costs one attribute read a request."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        doing = self.lifecycle.starting
        if doing is None or scope["type"] == "lifespan" or scope["path"] in STARTUP_PROBES:
            await self.app(scope, receive, send)
            return
        error = ApiError(
            503,
            f"Strata is starting ({doing}); retry in {RETRY_AFTER_S} s",
            type_="server_error",
            code="starting",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
        await refuse(scope, receive, send, error)
