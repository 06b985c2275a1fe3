"""Traces from the local trace store: a run's spans, and a whole trace by id.

Who sees what. `GET /v1/runs/{run_id}/trace` follows the run's ownership (`api/ownership.py`): the run's
owner, or a role that may read every run (that read is audited); anyone else gets 404. Spans carry the
user they were made for (`strata.owner`: the run's owner, or the authenticated caller of a request), so
`GET /v1/traces/{trace_id}` shows a caller only the spans of that trace that are theirs; a role with
`runs:read_all` sees every span (audited when some are another user's). A trace with nothing to show is
404, whether it does not exist or is someone else's, so trace ids cannot be probed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.agents.service import NotFound
from strata.api.auth import audit, principal
from strata.api.ownership import readable_run
from strata.api.state import AppState
from strata.security.rbac import Permission
from strata.store.spans import SpanRecord, SpanStore

router = APIRouter(tags=["traces"])
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def span_store(request: Request) -> SpanStore:
    """The local trace store; 404 when it is off (`tracing.local_store: false` or tracing disabled)."""
    state: AppState = request.app.state.strata
    store = state.chat.tracing.store  # the app's Tracing travels with its chat service
    if store is None:
        raise NotFound("no local trace store: tracing.local_store is off; look the trace up in your collector")
    return store


@router.get("/v1/runs/{run_id}/trace", summary="The spans of a run, from the local trace store")
async def run_trace(run_id: str, request: Request) -> Response:
    await readable_run(request, run_id)
    spans = await span_store(request).for_run(run_id)
    trace_ids = list(dict.fromkeys(span.trace_id for span in spans))
    return _json({"run_id": run_id, "trace_ids": trace_ids, "spans": [span_view(s) for s in spans]})


@router.get("/v1/traces/{trace_id}", summary="The spans of a trace you may see, from the local trace store")
async def get_trace(trace_id: str, request: Request) -> Response:
    trace_id = trace_id.lower()
    if not _TRACE_ID.match(trace_id):
        raise NotFound(f"no trace {trace_id!r}: a trace id is 32 hexadecimal digits")
    who = principal(request)
    spans = await span_store(request).trace(trace_id)
    if who.may(Permission.RUNS_READ_ALL):
        others = sorted({s.owner for s in spans if s.owner and s.owner != who.user})
        if others:
            details = {"owners": others, "method": request.method, "path": request.url.path}
            audit(request, "data.read_other_user", f"trace {trace_id!r}", details)
    else:
        spans = [s for s in spans if s.owner is not None and s.owner == who.user]
    if not spans:
        raise NotFound(f"no trace {trace_id!r}")
    return _json({"trace_id": trace_id, "spans": [span_view(s) for s in spans]})


def span_view(span: SpanRecord) -> dict[str, Any]:
    return {
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id,
        "name": span.name,
        "kind": span.kind,
        "start_time": iso_ns(span.start_ns),
        "end_time": iso_ns(span.end_ns),
        "duration_ms": round((span.end_ns - span.start_ns) / 1e6, 3),
        "status": span.status,
        "status_message": span.status_message,
        "run_id": span.run_id,
        "attributes": span.attributes,
        "events": [
            {"name": e.get("name"), "time": iso_ns(int(e.get("time_ns") or 0)), "attributes": e.get("attributes") or {}}
            for e in span.events
        ],
    }


def iso_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat()


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")
