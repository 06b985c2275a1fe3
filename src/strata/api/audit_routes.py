"""`/admin/audit`: read the audit trail and check its keyed hash chain against this replica's checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from strata.api.auth import Guard
from strata.api.errors import ApiError
from strata.security.audit_checkpoint import checkpoint_file, read_anchors

router = APIRouter(tags=["audit"])
FLUSH_WAIT_S = 2.0


@router.get("/admin/audit", summary="Audit events, oldest first; page with after_id")
async def list_audit(
    request: Request,
    action: Annotated[str | None, Query(max_length=64, pattern=r"^[\w.:-]*$")] = None,
    actor: Annotated[str | None, Query(max_length=160, pattern=r"^[^\x00]*$")] = None,
    since: datetime | None = None,
    after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    if since is not None:
        try:
            since = (since if since.tzinfo else since.replace(tzinfo=UTC)).astimezone(UTC)
        except OverflowError:
            raise ApiError(400, f"since: {since.isoformat()} is out of range", param="since") from None
    guard: Guard = request.app.state.strata.guard
    await _flush(guard)  # what this replica recorded a moment ago is part of the answer
    rows = await guard.audit.store.query(action=action, actor=actor, since=since, limit=limit, after_id=after_id)
    body = {"object": "list", "data": [row.to_json() for row in rows], "last_id": rows[-1].id if rows else after_id}
    return Response(orjson.dumps(body), media_type="application/json")


@router.get(
    "/admin/audit/verify",
    summary="Walk the keyed hash chain and compare it with the signed checkpoints; name what was tampered with",
)
async def verify_audit(request: Request) -> Response:
    guard: Guard = request.app.state.strata.guard
    await _flush(guard)
    store = guard.audit.store
    path = checkpoint_file(request.app.state.strata.config)
    anchors = await asyncio.to_thread(read_anchors, [path], store.keys)
    result = await store.verify(anchors=anchors)
    return Response(orjson.dumps(dataclasses.asdict(result)), media_type="application/json")


async def _flush(guard: Guard) -> None:
    """Bounded: with the database down, answer from what is stored rather than hang (events stay queued)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(guard.audit.flush(), FLUSH_WAIT_S)
