"""Operator views of the serving layer: every deployment with its health, load and breaker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.responses import Response

from strata.api.auth import audit_change, principal
from strata.api.errors import ApiError, invalid_body
from strata.api.state import AppState
from strata.compute.inventory import read_inventory_async
from strata.config_loader import ConfigError
from strata.serving.deploy_policy import DeployPolicy, DeployRefused
from strata.serving.hotswap import DeployFailed
from strata.store.model_versions import ReplicaRow

router = APIRouter(tags=["admin"])
metrics_router = APIRouter(tags=["metrics"])


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


@router.get("/admin/models", summary="Each model: its version here and on every replica, earlier versions")
async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.strata
    desired, replicas = await state.model_sync().view()
    data = []
    for name in sorted(set(state.deployer.history) | set(desired), key=_model_order(state)):
        serving = state.deployer.serving(name)
        wanted = desired.get(name)
        data.append(
            {
                "model": name,
                "version": serving.version if serving else None,
                "state": serving.state if serving else ("removed" if name in state.deployer.history else "absent"),
                "deployments": serving.deployments if serving else [],
                "reference": serving.reference if serving else None,
                "versions": [r.view() for r in state.deployer.history.get(name, [])],
                "desired": {"version": wanted.version, "reference": wanted.reference} if wanted else None,
                "replicas": [_replica_view(r) for r in replicas if r.model == name],
            }
        )
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


def _replica_view(row: ReplicaRow) -> dict[str, object]:
    seen_at = row.seen_at.isoformat() if row.seen_at else None
    return {"replica": row.replica, "version": row.version, "desired": row.desired, "state": row.state,
            "note": row.note, "seen_at": seen_at}  # fmt: skip


def _model_order(state: AppState) -> Callable[[str], tuple[int, str]]:
    """This replica's models in their order, then the others by name."""
    order = {name: index for index, name in enumerate(state.deployer.history)}
    return lambda name: (order.get(name, len(order)), name)


@router.post("/admin/models/{name}/deploy", summary="Hot-swap a model to a profile of the config or an endpoint")
async def deploy_model(
    name: str,
    request: Request,
    health_timeout_s: Annotated[float | None, Query(gt=0, le=3600)] = None,
) -> Response:
    """The body is `{"profile": name}` (a version declared under deploy.profiles) or an openai endpoint;
    see `strata.serving.deploy_policy` for what the API may and may not choose."""
    state: AppState = request.app.state.strata
    resource = f"model {name}"
    before = state.deployer.snapshot().get(name)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    try:
        resolved = await DeployPolicy(state.config.deploy).resolve(name, body)
    except (DeployRefused, ValidationError) as exc:
        error = _refusal(exc)
        outcome = "denied" if error.status == 403 else "failure"
        details = {"refused": error.param, "reason": error.message}
        audit_change(request, "model.deployed", resource, before, None, outcome=outcome, details=details)
        raise error from None
    config = resolved.config
    missing = [f for f in config.fallbacks if not state.router.is_model(f) or f == name]
    if missing:
        raise ApiError(400, f"unknown fallback models: {', '.join(missing)}", param="fallbacks")
    try:
        record = await state.model_sync().deploy(
            resolved, health_timeout_s=health_timeout_s, actor=principal(request).label
        )
    except DeployFailed as exc:
        audit_change(request, "model.deployed", resource, before, None, outcome="failure",
                     details={"requested": resolved.reference, "error": str(exc)})  # fmt: skip
        raise ApiError(502, str(exc), type_="server_error", code="deploy_failed") from None
    after = {"version": record.version, "reference": record.reference}
    audit_change(request, "model.deployed", resource, before, after, details={"kind": config.kind})
    view = {"model": record.model, "version": record.version, "state": record.state, "deployments": record.deployments,
            "reference": record.reference}  # fmt: skip
    return Response(orjson.dumps(view), media_type="application/json")


def _refusal(exc: DeployRefused | ValidationError) -> ApiError:
    if isinstance(exc, ValidationError):
        return invalid_body(exc.errors(include_url=False))
    type_ = "permission_error" if exc.status == 403 else "invalid_request_error"
    return ApiError(exc.status, exc.message, type_=type_, code=exc.code, param=exc.param)


@router.post("/admin/reload", summary="Re-read the configuration and apply model changes by hot swap")
async def reload(request: Request) -> Response:
    state: AppState = request.app.state.strata
    before = state.deployer.snapshot()
    try:
        report = await state.model_sync().reload(principal(request).label)
    except ConfigError as exc:
        audit_change(request, "config.reloaded", "config", before, None, outcome="failure",
                     details={"errors": [str(i) for i in exc.issues]})  # fmt: skip
        raise ApiError(400, "invalid configuration: " + "; ".join(str(i) for i in exc.issues)) from None
    audit_change(request, "config.reloaded", "config", before, state.deployer.snapshot(), details=report.__dict__)
    return Response(orjson.dumps(report.__dict__), media_type="application/json")


@metrics_router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.strata
    return Response(generate_latest(state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/gpus", summary="GPUs (NVML): memory, utilisation, temperature, power, topology")
async def list_gpus(request: Request) -> Response:
    inventory = await read_inventory_async()  # NVML is blocking: it runs in a thread
    return Response(orjson.dumps(inventory.to_dict()), media_type="application/json")
