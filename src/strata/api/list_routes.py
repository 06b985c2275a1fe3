"""Lists to find things by: `GET /v1/runs`, `GET /v1/sessions`, `GET /v1/traces`, newest first, a page at a time.

Every list has OpenAI's shape: `{"object": "list", "data": [...], "next_cursor", "has_more"}`; pass
`next_cursor` back as `cursor` for the next page. Pages are keyset pages (`store.pages`): runs started while a
client pages never shift a page, so no row repeats or is skipped.

Who sees what follows the single-item routes (`api/ownership.py`, `api/trace_routes.py`): a caller sees its own
user's rows; a role with `runs:read_all` sees everyone's, may filter by `user`, and a page that shows another
user's rows is audited. A caller who may see only its own rows and asks for another `user` gets 403.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.responses import Response

from strata.api.auth import audit, principal
from strata.api.errors import ApiError
from strata.api.ownership import service
from strata.api.trace_routes import iso_ns, span_store
from strata.api.usage_routes import flushed_usage
from strata.api.views import run_view, session_view
from strata.observability import tracing_genai as genai
from strata.security.rbac import Permission
from strata.store.pages import DEFAULT_LIMIT, MAX_AT, MAX_LIMIT, BadCursor, Page, Position
from strata.store.run_queries import RunFilter, RunQueries, SessionFilter, micros
from strata.store.runs import ACTIVE, TERMINAL
from strata.store.spans import TraceSummary

router = APIRouter(tags=["lists"])
STATUSES = (*ACTIVE, *TERMINAL)


class ListQuery(BaseModel):
    """What every list takes: a page size, where to go on from, and a time window on when things started."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Items per page.")
    cursor: str | None = Field(default=None, max_length=512, description="`next_cursor` of the page before.")
    from_: datetime | None = Field(default=None, alias="from", description="Started at or after (ISO; UTC).")
    to: datetime | None = Field(default=None, description="Started before (ISO date or date-time; UTC).")
    user: str | None = Field(default=None, min_length=1, max_length=128, description="Needs runs:read_all.")

    @field_validator("from_", "to")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:
            raise ValueError("must lie between the years 1 and 9999 in UTC") from None

    @model_validator(mode="after")
    def _window(self) -> ListQuery:
        if self.from_ is not None and self.to is not None and self.from_ >= self.to:
            raise ValueError(f"'from' ({self.from_.isoformat()}) must be before 'to' ({self.to.isoformat()})")
        return self

    def position(self, kind: str) -> Position | None:
        if self.cursor is None:
            return None
        try:
            return Position.decode(self.cursor, kind)
        except BadCursor as exc:
            raise ApiError(400, f"cursor: {exc}", param="cursor") from None


class RunListQuery(ListQuery):
    agent: str | None = Field(default=None, min_length=1, max_length=64)
    status: str | None = Field(default=None, description=f"One or more, comma-separated: {', '.join(STATUSES)}.")
    session_id: str | None = Field(default=None, min_length=1, max_length=40)

    @field_validator("status")
    @classmethod
    def _statuses(cls, value: str | None) -> str | None:
        if value is not None:
            unknown = [s for s in value.split(",") if s.strip() not in STATUSES]
            if unknown:
                raise ValueError(f"{unknown[0].strip()!r} is not a run status ({', '.join(STATUSES)})")
        return value

    @property
    def statuses(self) -> list[str]:
        return [s.strip() for s in self.status.split(",")] if self.status else []


class SessionListQuery(ListQuery):
    agent: str | None = Field(default=None, min_length=1, max_length=64)


@router.get("/v1/runs", summary="Runs, newest first: filter by agent, status, user, session and time")
async def list_runs(request: Request, query: Annotated[RunListQuery, Query()]) -> Response:
    where = RunFilter(
        owner=_owner(request, query.user),
        agent=query.agent,
        statuses=query.statuses,
        session_id=query.session_id,
        since=query.from_,
        until=query.to,
    )
    page = await _queries(request).runs(where, query.limit, query.position("runs"))
    _audit_others(request, "runs", [run.owner for run in page.items])
    return _list([run_view(run) for run in page.items], page, "runs")


@router.get("/v1/sessions", summary="Sessions, newest first: filter by agent, user and time")
async def list_sessions(request: Request, query: Annotated[SessionListQuery, Query()]) -> Response:
    where = SessionFilter(owner=_owner(request, query.user), agent=query.agent, since=query.from_, until=query.to)
    queries = _queries(request)
    page = await queries.sessions(where, query.limit, query.position("sessions"))
    _audit_others(request, "sessions", [session.owner for session in page.items])
    counts = await queries.run_counts([session.id for session in page.items])
    data = [{**session_view(s), "owner": s.owner, "runs": counts.get(s.id, 0)} for s in page.items]
    return _list(data, page, "sessions")


@router.get("/v1/traces", summary="Recent traces from the local trace store: root span, duration, status, cost")
async def list_traces(request: Request, query: Annotated[ListQuery, Query()]) -> Response:
    owner = _owner(request, query.user)
    page = await span_store(request).recent(
        query.limit,
        query.position("traces"),
        owner=owner,
        since_ns=_ns(query.from_),
        until_ns=_ns(query.to),
    )
    _audit_others(request, "traces", [trace.root.owner for trace in page.items])
    costs = await _costs(request, page.items)
    return _list([_trace_view(trace, costs.get(trace.trace_id, 0.0)) for trace in page.items], page, "traces")


def _owner(request: Request, user: str | None) -> str | None:
    """Whose rows the caller may list: its own, or (with runs:read_all) `user`'s or everyone's (None)."""
    who = principal(request)
    if who.may(Permission.RUNS_READ_ALL):
        return user
    if user is not None and user != who.user:
        raise ApiError(
            403, "user: this key may list only its own user's runs, sessions and traces",
            type_="permission_error", code="forbidden", param="user",
        )  # fmt: skip
    return who.user


def _audit_others(request: Request, what: str, owners: list[str | None]) -> None:
    who = principal(request)
    others = sorted({owner for owner in owners if owner and owner != who.user})
    if others:
        details = {"owners": others, "method": request.method, "path": request.url.path}
        audit(request, "data.read_other_user", f"{what} list", details)


async def _costs(request: Request, traces: list[TraceSummary]) -> dict[str, float]:
    """Each trace's cost: the usage rows of its runs and of the request at its root."""
    by_run = {run_id: t.trace_id for t in traces for run_id in t.run_ids}
    by_request = {str(rid): t.trace_id for t in traces if (rid := t.root.attributes.get(genai.REQUEST_ID))}
    if not by_run and not by_request:
        return {}
    await flushed_usage(request)
    costs: dict[str, float] = {}
    for run_id, request_id, cost in await _queries(request).cost_of(list(by_run), list(by_request)):
        trace_id = by_run.get(run_id or "") or by_request.get(request_id or "")
        if trace_id is not None:
            costs[trace_id] = costs.get(trace_id, 0.0) + cost
    return costs


def _trace_view(trace: TraceSummary, cost: float) -> dict[str, Any]:
    root = trace.root
    return {
        "object": "trace",
        "trace_id": trace.trace_id,
        "name": root.name,
        "root": {
            "span_id": root.span_id,
            "name": root.name,
            "kind": root.kind,
            "status": root.status,
            "run_id": root.run_id,
            "agent": root.attributes.get(genai.AGENT_NAME),
            "model": root.attributes.get(genai.REQUEST_MODEL),
        },
        "status": "error" if trace.errors else root.status,
        "start_time": iso_ns(trace.start_ns),
        "end_time": iso_ns(trace.end_ns),
        "duration_ms": round((trace.end_ns - trace.start_ns) / 1e6, 3),
        "spans": trace.spans,
        "errors": trace.errors,
        "run_ids": trace.run_ids,
        "cost_usd": round(cost, 8),
    }


def _queries(request: Request) -> RunQueries:
    return RunQueries(service(request).store.db)


def _ns(when: datetime | None) -> int | None:
    return None if when is None else min(micros(when) * 1000, MAX_AT)  # span times are 64-bit nanoseconds


def _list(data: list[dict[str, Any]], page: Page[Any], kind: str) -> Response:
    body = {
        "object": "list",
        "data": data,
        "next_cursor": page.next.encode(kind) if page.next else None,
        "has_more": page.next is not None,
    }
    return Response(orjson.dumps(body), media_type="application/json")
