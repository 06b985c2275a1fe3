"""A Responses API request for model `agent:<name>`: a durable run of that Strata agent, so its tools, guards,
approvals, traces and costs apply. Only AgentService's public start/wait/follow API is used.

The input is the run's user message; `previous_response_id` continues the earlier run's session. A run that
stops to wait for approval answers `status: "incomplete"` with `incomplete_details.reason: "awaiting_approval"`,
the run's id and where to approve; `GET /v1/responses/{id}` then follows the run to its end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from strata.agents.bus import Subscription
from strata.agents.service import AgentService
from strata.api.auth import principal
from strata.api.chat_accounting import admit_budget
from strata.api.errors import ApiError
from strata.api.load_shedding import release_slot
from strata.api.responses_translate import (
    ResponsesRequest,
    ResponseStream,
    input_messages,
    message_item,
    new_id,
    response_object,
    usage_view,
)
from strata.api.state import AppState
from strata.security.rbac import Permission
from strata.serving.usage import Usage
from strata.store.responses import ResponseStore
from strata.store.tables import Run, StoredResponse

AGENT_PREFIX = "agent:"
_SETTINGS = (
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
)
_ENDED = ("completed", "failed", "cancelled", "incomplete")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def agent_response(
    request: Request, body: ResponsesRequest, previous: StoredResponse | None, store: ResponseStore
) -> Response:
    state: AppState = request.app.state.strata
    name = body.model.removeprefix(AGENT_PREFIX)
    for setting in _SETTINGS:
        if getattr(body, setting) is not None:
            raise ApiError(
                400,
                f"{setting}: an agent model runs with its agent's own {setting}; leave it out",
                param=setting,
                code="unsupported_parameter",
            )
    if previous is not None and previous.model != body.model:
        raise ApiError(
            400,
            f"previous_response_id: {previous.id!r} was answered by model {previous.model!r}, not {body.model!r}",
            param="previous_response_id",
        )
    who = principal(request)
    if not who.may(Permission.AGENTS_INVOKE):
        raise ApiError(
            403,
            "model 'agent:...' starts an agent run, which needs the agents:invoke permission",
            type_="permission_error",
            code="permission_denied",
        )
    if not who.may_use_agent(name):
        raise ApiError(403, f"this key may not run agent {name!r}", type_="permission_error", code="agent_not_allowed")
    await admit_budget(state, who, name)
    agents = state.agent_service()
    run, _ = await agents.start_run(
        name,
        _user_message(body),
        session_id=previous.session_id if previous is not None else None,
        idempotency_key=None,
        owner=who.user,
        key_id=who.key_id,
        models=who.models,
        wake=not body.stream,
    )
    response_id, created_at = new_id("resp"), time.time()
    snapshot = response_object(body, response_id=response_id, created_at=created_at, status="queued")
    snapshot["metadata"] = {**snapshot["metadata"], "strata_run_id": run.id}
    keep = store if body.store else None
    if body.stream:
        subscription = agents.subscribe(run.id)  # before the worker can start it: no delta is missed
        agents.worker.wake()
        events = _events(
            agents, run.id, subscription, ResponseStream({**snapshot, "status": "in_progress"}), keep, who.user
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    if not body.background:
        release_slot(request.scope)  # waiting for the run is not work in progress (see api/load_shedding.py)
        run, _steps = await agents.wait_answer(run.id, state.config.runs.sync_wait_s)
        snapshot = apply_run(snapshot, run)
    if keep is not None:
        await keep.save(snapshot, owner=who.user, conversation=[], run_id=run.id, session_id=run.session_id)
    return Response(orjson.dumps(snapshot), media_type="application/json")


def _user_message(body: ResponsesRequest) -> dict[str, Any]:
    messages = input_messages(body)
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise ApiError(
            400,
            "input: an agent run starts from one user message (text, or one user message item); "
            "its tools run inside Strata, so there are no function call outputs to send",
            param="input",
        )
    return messages[0]


def apply_run(body: dict[str, Any], run: Run) -> dict[str, Any]:
    """The response object as the run stands now."""
    body = {
        **body,
        "usage": usage_view(Usage(run.prompt_tokens, run.completion_tokens)),
        "error": None,
        "incomplete_details": None,
    }
    if run.status == "completed":
        body.update(status="completed", output=[message_item(run.output or "")], completed_at=int(time.time()))
    elif run.status == "awaiting_approval":
        calls = ", ".join(str(c.get("name")) for c in run.pending_approval or ())
        body.update(
            status="incomplete",
            incomplete_details={
                "reason": "awaiting_approval",
                "run_id": run.id,
                "pending": calls,
                "message": f"run {run.id} waits for approval of {calls}: POST /v1/runs/{run.id}/approval "
                '{"decision": "approve"} (or "deny"), then GET this response again',
            },
        )
    elif run.status in ("failed", "cancelled"):
        body.update(
            status=run.status if run.status == "cancelled" else "failed",
            error={"code": f"run_{run.status}", "message": run.status_reason or f"run {run.id} {run.status}"},
        )
    else:
        body["status"] = "queued" if run.status == "queued" else "in_progress"
    return body


async def refresh(state: AppState, store: ResponseStore, row: StoredResponse) -> dict[str, Any]:
    """A stored agent response, brought up to date with its run (which may have gone on since)."""
    if row.status in _ENDED and row.status != "incomplete":
        return row.body
    assert row.run_id is not None
    body = apply_run(row.body, await state.agent_service().run(row.run_id))
    if body["status"] != row.status:
        await store.update(body)
    return body


async def _events(
    agents: AgentService,
    run_id: str,
    subscription: Subscription,
    events: ResponseStream,
    store: ResponseStore | None,
    owner: str | None,
) -> AsyncIterator[bytes]:
    for event in events.start():
        yield event
    async for live in agents.follow(run_id, 0, subscription=subscription):
        if live.type == "message.delta" and isinstance(live.data.get("content"), str) and live.data["content"]:
            for event in events.text_delta(live.data["content"]):
                yield event
        elif live.type == "approval.requested":
            break  # the run pauses: this response ends incomplete (see apply_run)
    run = await agents.run(run_id)
    if not events.output and run.output:  # the deltas were not live here (another replica ran it)
        for event in events.text_delta(run.output):
            yield event
    final = apply_run(events.snapshot, run)
    status = final["status"] if final["status"] in _ENDED else "incomplete"
    closing = events.finish(
        Usage(run.prompt_tokens, run.completion_tokens),
        status=status,
        incomplete=final["incomplete_details"],
        error=final["error"],
    )
    for event in closing:
        yield event
    if store is not None:
        await store.save(events.snapshot, owner=owner, conversation=[], run_id=run.id, session_id=run.session_id)
