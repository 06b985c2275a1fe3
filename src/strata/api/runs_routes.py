"""Agent runs over REST and SSE: start (sync, stream or background), inspect, follow, cancel, approve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response, StreamingResponse

from strata.agents.bus import LiveEvent, Subscription
from strata.agents.service import AgentService, ApprovalDecision
from strata.api.auth import audit, principal
from strata.api.chat_accounting import admit_budget
from strata.api.errors import ApiError
from strata.api.load_shedding import release_slot
from strata.api.ownership import readable_run, service, writable_run
from strata.api.state import AppState
from strata.api.views import run_view, step_view
from strata.serving.schemas import ChatMessage

router = APIRouter(tags=["runs"])
MAX_SEQ = 2**31 - 1  # event numbers are 32-bit in the database
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | ChatMessage = Field(description="The user's message: text, or an OpenAI-style message.")
    session_id: str | None = Field(default=None, description="Continue this session; default: a new one.")
    mode: Literal["sync", "stream", "background"] = "sync"
    wait_s: float | None = Field(default=None, gt=0, le=3600, description="mode=sync: the longest wait.")


class ApprovalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "deny"]
    call_id: str | None = Field(default=None, description="One pending call; default: all of them.")
    binding: str | None = Field(
        default=None,
        max_length=64,
        description="The pending call's `binding` (from `approval.requested` or `pending_approval`): the decision "
        "applies to that exact call only, and is refused with 409 if it is no longer pending.",
    )
    arguments: dict[str, Any] | None = Field(default=None, description="Approve with these arguments instead.")
    comment: str | None = None


def user_message(value: str | ChatMessage) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "user", "content": value}
    if value.role != "user":
        # Anything else would let a client act as the model (say, an assistant turn with tool calls).
        raise ApiError(400, f"input: a run starts from a user message, not role {value.role!r}", param="input.role")
    return value.model_dump(exclude_none=True)


def sse(event: LiveEvent) -> bytes:
    data = orjson.dumps({"type": event.type, "run_id": event.run_id, "seq": event.seq, **event.data})
    head = f"id: {event.seq}\n" if event.seq is not None else ""
    return f"{head}event: {event.type}\n".encode() + b"data: " + data + b"\n\n"


async def sse_stream(
    agents: AgentService,
    run_id: str,
    after: int,
    subscription: Subscription | None = None,
) -> AsyncIterator[bytes]:
    async for event in agents.follow(run_id, after, subscription=subscription):
        yield sse(event)


@router.post("/v1/agents/{agent}/runs", status_code=200, summary="Start a run of an agent")
async def create_run(
    agent: str,
    body: RunRequest,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    agents = service(request)
    state: AppState = request.app.state.strata
    who = principal(request)
    if not who.may_use_agent(agent):
        raise ApiError(403, f"this key may not run agent {agent!r}", type_="permission_error", code="agent_not_allowed")
    await admit_budget(state, who, agent)
    run, _created = await agents.start_run(
        agent,
        user_message(body.input),
        session_id=body.session_id,
        idempotency_key=idempotency_key,
        owner=who.user,
        key_id=who.key_id,
        models=who.models,
        wake=body.mode != "stream",
    )
    if body.mode == "stream":
        subscription = agents.subscribe(run.id)  # before the worker can start it: no delta is missed
        agents.worker.wake()
        stream = sse_stream(agents, run.id, 0, subscription)
        return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
    if body.mode == "background":
        return _json(run_view(run), 202, {"Location": f"/v1/runs/{run.id}"})
    release_slot(request.scope)  # waiting for the run is not work in progress (see api/load_shedding.py)
    run, steps = await agents.wait_answer(run.id, body.wait_s or state.config.runs.sync_wait_s)
    finished = run.status in ("completed", "failed", "cancelled", "awaiting_approval")
    return _json(run_view(run, steps), 200 if finished else 202)


@router.get("/v1/runs/{run_id}", summary="A run: status, steps, usage and cost")
async def get_run(run_id: str, request: Request) -> Response:
    run = await readable_run(request, run_id)
    return _json(run_view(run, await service(request).store.steps(run_id)))


@router.get("/v1/runs/{run_id}/events", summary="The run's events as SSE; resumable with Last-Event-ID")
async def run_events(
    run_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="Same as Last-Event-ID")] = None,
) -> Response:
    agents = service(request)
    await readable_run(request, run_id)
    start = after if after is not None else _seq(last_event_id)
    return StreamingResponse(sse_stream(agents, run_id, start), media_type="text/event-stream", headers=_SSE_HEADERS)


@router.post("/v1/runs/{run_id}/cancel", summary="Cancel a run")
async def cancel_run(run_id: str, request: Request) -> Response:
    await writable_run(request, run_id)
    return _json(run_view(await service(request).cancel(run_id)))


@router.post("/v1/runs/{run_id}/approval", summary="Approve or deny the tool calls a run is waiting on")
async def approve_run(run_id: str, body: ApprovalRequest, request: Request) -> Response:
    run = await writable_run(request, run_id)
    decision = ApprovalDecision(body.decision, body.call_id, body.arguments, body.comment, body.binding)
    approved, calls = await service(request).approve(run_id, decision)
    details = {
        "decision": body.decision,
        "call_id": body.call_id,
        "owner": run.owner,
        "edited": bool(body.arguments),
        "calls": [{k: c.get(k) for k in ("id", "name", "turn", "binding")} for c in calls],
    }
    audit(request, "run.approval", f"run {run_id}", details)
    return _json(run_view(approved))


@router.get("/v1/runs/{run_id}/steps", summary="The run's steps")
async def run_steps(run_id: str, request: Request) -> Response:
    agents = service(request)
    await readable_run(request, run_id)
    return _json({"object": "list", "data": [step_view(s) for s in await agents.store.steps(run_id)]})


def _seq(last_event_id: str | None) -> int:
    if not last_event_id:
        return 0
    try:
        return min(max(0, int(last_event_id)), MAX_SEQ)
    except ValueError:
        raise ApiError(
            400, f"Last-Event-ID must be an event number, got {last_event_id!r}", param="Last-Event-ID"
        ) from None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
