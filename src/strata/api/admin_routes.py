"""Operator views of the serving layer: every deployment with its health, load and breaker."""

from __future__ import annotations

import os
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from strata.api.auth import audit
from strata.api.errors import ApiError, invalid_body
from strata.api.reload import reload_config
from strata.api.state import AppState
from strata.compute.inventory import read_inventory_async
from strata.config import ModelConfig
from strata.config_loader import ConfigError
from strata.serving.hotswap import DeployFailed

router = APIRouter(tags=["admin"])
metrics_router = APIRouter(tags=["metrics"])
_MODEL: TypeAdapter[ModelConfig] = TypeAdapter(ModelConfig)


@router.get("/admin/deployments", summary="Each deployment: health, load, circuit breaker")
async def list_deployments(request: Request) -> Response:
    state: AppState = request.app.state.strata
    data = []
    for deployment in state.router.deployments:
        breaker = await deployment.breaker.snapshot()
        data.append(
            {
                "model": deployment.model,
                "deployment": deployment.name,
                "kind": deployment.kind,
                "target": deployment.client.base_url,
                "weight": deployment.weight,
                "healthy": deployment.healthy,
                "state": deployment.state,
                "in_flight": deployment.admission.in_flight,
                "queued": deployment.admission.queued,
                # Too few of the model's breakers are closed: every deployment takes requests, open ones too.
                "panic": state.router.pool(deployment.model).panicking,
                "paused_s": round(deployment.paused_for_s, 3),  # what is left of the Retry-After it gave
                "breaker": {
                    "state": breaker.state.value,
                    "consecutive_failures": breaker.consecutive_failures,
                    "window_failures": breaker.window_failures,
                    "window_requests": breaker.window_requests,
                    "retry_in_s": round(breaker.retry_in_s, 3),
                    "probes_in_flight": breaker.probes_in_flight,
                    "shared_store_ok": breaker.store_ok,
                },
            }
        )
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/admin/models", summary="Each model: its version in service, earlier versions still draining")
async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.strata
    data = []
    for name, records in state.deployer.history.items():
        serving = next((r for r in reversed(records) if r.state == "serving"), None)
        data.append(
            {
                "model": name,
                "version": serving.version if serving else None,
                "state": serving.state if serving else "removed",
                "deployments": serving.deployments if serving else [],
                "versions": [
                    {"version": r.version, "state": r.state, "deployments": r.deployments, "note": r.note}
                    for r in records
                ],
            }
        )
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.post("/admin/models/{name}/deploy", summary="Hot-swap a model to a new version of its deployments")
async def deploy_model(
    name: str,
    request: Request,
    health_timeout_s: Annotated[float | None, Query(gt=0, le=3600)] = None,
) -> Response:
    state: AppState = request.app.state.strata
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a model config object")
    try:
        config = _MODEL.validate_python({**body, "name": name}, context={"environ": os.environ})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        tagged = bool(errors) and errors[0]["loc"][:1] == (body.get("kind"),)  # the union's tag leads the path
        raise invalid_body(errors, skip=1 if tagged else 0) from None
    missing = [f for f in config.fallbacks if not state.router.is_model(f) or f == name]
    if missing:
        raise ApiError(400, f"unknown fallback models: {', '.join(missing)}", param="fallbacks")
    try:
        record = await state.deployer.deploy(config, health_timeout_s=health_timeout_s)
    except DeployFailed as exc:
        audit(request, "model.deployed", f"model {name}", {"error": str(exc)}, outcome="failure")
        raise ApiError(502, str(exc), type_="server_error", code="deploy_failed") from None
    audit(request, "model.deployed", f"model {name}", {"version": record.version, "kind": config.kind})
    view = {"model": record.model, "version": record.version, "state": record.state, "deployments": record.deployments}
    return Response(orjson.dumps(view), media_type="application/json")


@router.post("/admin/reload", summary="Re-read the configuration and apply model changes by hot swap")
async def reload(request: Request) -> Response:
    state: AppState = request.app.state.strata
    try:
        report = await reload_config(state)
    except ConfigError as exc:
        audit(request, "config.reloaded", "config", {"errors": [str(i) for i in exc.issues]}, outcome="failure")
        raise ApiError(400, "invalid configuration: " + "; ".join(str(i) for i in exc.issues)) from None
    audit(request, "config.reloaded", "config", report.__dict__)
    return Response(orjson.dumps(report.__dict__), media_type="application/json")


@metrics_router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.strata
    return Response(generate_latest(state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/gpus", summary="GPUs (NVML): memory, utilisation, temperature, power, topology")
async def list_gpus(request: Request) -> Response:
    inventory = await read_inventory_async()  # NVML is blocking: it runs in a thread
    return Response(orjson.dumps(inventory.to_dict()), media_type="application/json")
