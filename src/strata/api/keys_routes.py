"""`/admin/keys`: create, list, update, rotate and revoke API keys. A key's secret is shown once."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from strata.api.auth import Guard, audit, principal
from strata.api.errors import ApiError
from strata.config import MODEL_NAME_PATTERN, RoleName
from strata.store.keys import KeyNotFound, KeyRecord, KeySpec, KeyStore

router = APIRouter(tags=["keys"])
MAX_COUNT = 2**31 - 1  # what every database stores as an integer
MAX_LIFETIME_S = 100 * 365 * 86400
NAME = r"^[A-Za-z0-9][A-Za-z0-9 ._@:-]{0,127}$"


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    role: RoleName = "user"
    user: str | None = Field(default=None, pattern=NAME, description="Owner of its runs and usage; default: name.")
    models: list[str] | None = Field(default=None, description="Models it may call; default: all.")
    agents: list[str] | None = Field(default=None, description="Agents it may run; default: all.")
    rpm: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Tokens per minute, prompt + completion.")
    budget_usd: float | None = Field(default=None, gt=0, le=1e12)
    expires_at: datetime | None = None
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_LIFETIME_S, description="Alternative to expires_at.")

    @field_validator("expires_at")
    @classmethod
    def _reasonable_expiry(cls, value: datetime | None) -> datetime | None:
        return _within_lifetime(value)


def _within_lifetime(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    try:
        if value.astimezone(UTC) > now + timedelta(seconds=MAX_LIFETIME_S):
            raise ValueError("must be within 100 years from now")
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: RoleName | None = None
    models: list[str] | None = None
    agents: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    tpm: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    budget_usd: float | None = Field(default=None, gt=0, le=1e12)


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap_s: float = Field(default=3600.0, ge=0, le=30 * 86400, description="How long the old key keeps working.")


def key_view(key: KeyRecord, secret: str | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "user": key.user,
        "role": key.role,
        "prefix": key.prefix,
        "models": key.models,
        "agents": key.agents,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "budget_usd": key.budget_usd,
        "created_at": key.created_at.isoformat(),
        "created_by": key.created_by,
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "rotated_from": key.rotated_from,
        "active": key.active(datetime.now(UTC)),
    }
    if secret is not None:
        view["key"] = secret  # the only time it is ever shown
    return view


def _store(request: Request) -> KeyStore:
    guard: Guard = request.app.state.strata.guard
    return guard.auth.keys


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _check_names(values: list[str] | None, param: str) -> None:
    for value in values or ():
        if not re.match(MODEL_NAME_PATTERN, value):
            raise ApiError(400, f"{param}: {value!r} is not a valid name", param=param)


@router.post("/admin/keys", status_code=201, summary="Create an API key (its secret is in this response only)")
async def create_key(body: KeyRequest, request: Request) -> Response:
    _check_names(body.models, "models")
    _check_names(body.agents, "agents")
    if body.expires_at is not None and body.expires_in_s is not None:
        raise ApiError(400, "set expires_at or expires_in_s, not both", param="expires_in_s")
    expires = body.expires_at
    if body.expires_in_s is not None:
        expires = datetime.now(UTC) + timedelta(seconds=body.expires_in_s)
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    spec = KeySpec(
        name=body.name,
        role=body.role,
        user=body.user,
        models=body.models,
        agents=body.agents,
        rpm=body.rpm,
        tpm=body.tpm,
        budget_usd=body.budget_usd,
        expires_at=expires,
    )
    key, secret = await _store(request).create(spec, created_by=principal(request).label)
    audit(request, "key.created", f"key {key.id}", {"name": key.name, "role": key.role, "user": key.user})
    return _json(key_view(key, secret), 201)


@router.get("/admin/keys", summary="API keys (never their secrets)")
async def list_keys(request: Request, include_revoked: bool = False) -> Response:
    keys = await _store(request).list(include_revoked=include_revoked)
    return _json({"object": "list", "data": [key_view(k) for k in keys]})


@router.get("/admin/keys/{key_id}", summary="One API key")
async def get_key(key_id: str, request: Request) -> Response:
    try:
        return _json(key_view(await _store(request).get(key_id)))
    except KeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None


@router.patch("/admin/keys/{key_id}", summary="Change a key's role, allowed models and agents, or limits")
async def update_key(key_id: str, body: KeyUpdate, request: Request) -> Response:
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise ApiError(400, "nothing to change: send role, models, agents, rpm, tpm or budget_usd")
    _check_names(body.models, "models")
    _check_names(body.agents, "agents")
    try:
        before, after = await _store(request).update(key_id, **changes)
    except KeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None
    guard: Guard = request.app.state.strata.guard
    await guard.auth.forget(key_id)  # every replica re-reads it on its next request
    action = "key.role_changed" if before.role != after.role else "key.updated"
    audit(request, action, f"key {key_id}", {"changes": changes, "role_before": before.role})
    return _json(key_view(after))


@router.post("/admin/keys/{key_id}/rotate", summary="A new secret with the same grants; the old one expires later")
async def rotate_key(key_id: str, body: RotateRequest, request: Request) -> Response:
    try:
        key, secret = await _store(request).rotate(
            key_id, timedelta(seconds=body.overlap_s), created_by=principal(request).label
        )
    except KeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None
    guard: Guard = request.app.state.strata.guard
    await guard.auth.forget(key_id)  # its new expiry applies everywhere
    audit(request, "key.rotated", f"key {key_id}", {"new_key": key.id, "overlap_s": body.overlap_s})
    return _json(key_view(key, secret), 201)


@router.post("/admin/keys/{key_id}/revoke", summary="Revoke a key, at once, on every replica")
async def revoke_key(key_id: str, request: Request) -> Response:
    try:
        key = await _store(request).revoke(key_id)
    except KeyNotFound as exc:
        raise ApiError(404, str(exc), code="key_not_found") from None
    guard: Guard = request.app.state.strata.guard
    await guard.auth.forget(key_id)
    audit(request, "key.revoked", f"key {key_id}", {"name": key.name})
    return _json(key_view(key))
