"""`/v1/responses`: the OpenAI Responses API (the Agents SDK's default) over any chat model, or a Strata agent.

A chat model's response goes through exactly the path of `/v1/chat/completions` (the same ChatService call, the
same ChatAccount: budgets, usage, cost, metrics, traces); `responses_translate` maps the shapes. A model named
`agent:<name>` starts a durable run of that agent instead (`responses_agent`). Stored responses (`store`, the
default) are kept encrypted, visible to their owner only, for `GET`, `DELETE` and `previous_response_id`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from strata.api.auth import principal
from strata.api.chat_accounting import COST_HEADER, ChatAccount
from strata.api.errors import ApiError, from_serving_error, invalid_body
from strata.api.openai_routes import admit_chat, check_bounds, metered, send_chat
from strata.api.request_id import current_request_id
from strata.api.responses_agent import AGENT_PREFIX, agent_response, refresh
from strata.api.responses_translate import (
    ResponsesRequest,
    ResponseStream,
    assistant_message,
    chat_payload,
    ending,
    from_completion,
    new_id,
    parse_request,
    response_object,
)
from strata.api.state import AppState
from strata.serving.chat import ChatCall, Completion
from strata.serving.errors import ServingError
from strata.serving.schemas import ChatCompletionRequest
from strata.serving.stream_relay import ChatStreamRelay, StreamStats
from strata.store.responses import ResponseStore
from strata.store.tables import StoredResponse

router = APIRouter(prefix="/v1", tags=["openai"])
log = structlog.get_logger("strata.responses")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REQUEST_SCHEMA = ResponsesRequest.model_json_schema()


def _store(state: AppState) -> ResponseStore:
    return ResponseStore(state.agent_runtime().db)


def _missing(response_id: str, param: str | None = None) -> ApiError:
    where = f"{param}: " if param else ""
    return ApiError(404, f"{where}no response {response_id!r}", code="response_not_found", param=param)


def _json(body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


@router.post(
    "/responses",
    summary="Create a response (OpenAI Responses API)",
    openapi_extra={  # the body is read raw (parse_request), so FastAPI would not describe it
        "requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMA}}}
    },
)
async def create_response(request: Request) -> Response:
    state: AppState = request.app.state.strata
    raw = await request.body()
    try:
        payload = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    body = parse_request(payload)
    who = principal(request)
    store = _store(state)
    previous = None
    if body.previous_response_id is not None:
        previous = await store.get(body.previous_response_id, who.user)
        if previous is None:  # another user's response reads as missing too: ids cannot be probed
            raise _missing(body.previous_response_id, "previous_response_id")
    if body.model.startswith(AGENT_PREFIX):
        return await agent_response(request, body, previous, store)
    if previous is not None and previous.run_id is not None:
        raise ApiError(
            400,
            f"previous_response_id: {previous.id!r} was answered by agent model {previous.model!r}; "
            "continue it with that model",
            param="previous_response_id",
        )
    tag = request.headers.get("x-strata-tag") or (body.metadata or {}).get("tag")  # for route rules, as on chat
    call = _chat_call(state, body, previous.conversation if previous is not None else [], tag)
    call, account = await admit_chat(request, call)
    response_id, created_at = new_id("resp"), time.time()
    conversation = call.payload["messages"][1 if body.instructions else 0 :]
    if body.background:
        if len(state.lifecycle.background) >= state.config.limits.max_background_responses:
            raise ApiError(
                503,
                "too many background responses in progress on this replica; retry shortly",
                type_="server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        state.router.resolve(call.request.model)  # an unknown model is a 404 now, not a failed response later
        queued = response_object(body, response_id=response_id, created_at=created_at, status="queued")
        await store.save(queued, owner=who.user, conversation=conversation)
        task = asyncio.create_task(_in_background(state, store, body, queued, call, account, conversation))
        state.lifecycle.background.add(task)
        task.add_done_callback(state.lifecycle.background.discard)
        return _json(queued)
    answer = await send_chat(request, call, account)
    if isinstance(answer, ChatStreamRelay):
        snapshot = response_object(body, response_id=response_id, created_at=created_at, status="in_progress")
        events = ResponseStream(snapshot)
        stream = _stream_events(
            metered(answer, account, state.lifecycle.streams),
            answer.stats,
            events,
            store if body.store else None,
            who.user,
            conversation,
        )
        return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
    usd = account.settle(answer.usage, busy_s=answer.busy_s, served_by=answer.model)
    result = _answer(body, response_id, created_at, answer)
    if body.store:
        await store.save(result, owner=who.user, conversation=[*conversation, assistant_message(result["output"])])
    return _json(result, {COST_HEADER: f"{usd:.9f}"})


def _chat_call(state: AppState, body: ResponsesRequest, history: list[dict[str, Any]], tag: str | None) -> ChatCall:
    payload = chat_payload(body, history)
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:  # what the chat schema refuses of the translated request (a bad tool name...)
        raise invalid_body(exc.errors(include_url=False)) from None
    check_bounds(request, state.config.limits)
    return ChatCall(request, payload, tag=tag)


def _answer(body: ResponsesRequest, response_id: str, created_at: float, completion: Completion) -> dict[str, Any]:
    output, finish_reason = from_completion(orjson.loads(completion.body))
    status, incomplete = ending(finish_reason)
    return response_object(
        body,
        response_id=response_id,
        created_at=created_at,
        status=status,
        output=output,
        usage=completion.usage,
        incomplete=incomplete,
    )


async def _stream_events(
    chunks: AsyncIterator[bytes],
    stats: StreamStats,
    events: ResponseStream,
    store: ResponseStore | None,
    owner: str | None,
    conversation: list[dict[str, Any]],
) -> AsyncIterator[bytes]:
    for event in events.start():
        yield event
    error: dict[str, Any] | None = None
    async for chunk in chunks:  # the chat stream, metered exactly as /v1/chat/completions meters it
        if not chunk.startswith(b"data: "):
            continue
        try:
            data = orjson.loads(chunk[6:])
        except orjson.JSONDecodeError:
            continue  # not a chunk (the relay passes through what the backend sent)
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("error"), dict):
            error = data["error"]
            continue
        for event in events.feed(data):
            yield event
    if error is not None:
        closing = events.fail(str(error.get("code") or "upstream_error"), str(error.get("message") or ""), stats.usage)
    else:
        closing = events.finish(stats.usage)
    for event in closing:
        yield event
    if store is not None:
        ended = [*conversation, assistant_message(events.output)] if error is None else conversation
        await store.save(events.snapshot, owner=owner, conversation=ended)


async def _in_background(
    state: AppState,
    store: ResponseStore,
    body: ResponsesRequest,
    queued: dict[str, Any],
    call: ChatCall,
    account: ChatAccount,
    conversation: list[dict[str, Any]],
) -> None:
    """A `background: true` response: answered after the request returned, its stored row updated when done.
    If Strata stops first, the row says so (failed, `interrupted`) rather than staying in progress forever."""
    request_id = current_request_id()
    headers = {"X-Request-ID": request_id} if request_id else {}
    await store.update({**queued, "status": "in_progress"})
    try:
        completion = await state.chat.complete(call, headers)
    except ServingError as exc:
        account.settle(None, status=from_serving_error(exc).status, error_type=exc.code or type(exc).__name__)
        await store.update(
            {**queued, "status": "failed", "error": {"code": exc.code or "upstream_error", "message": exc.message}}
        )
        return
    except asyncio.CancelledError:
        await store.update(
            {
                **queued,
                "status": "failed",
                "error": {
                    "code": "interrupted",
                    "message": "Strata stopped before this background response finished; create it again",
                },
            }
        )
        raise
    account.settle(completion.usage, busy_s=completion.busy_s, served_by=completion.model)
    answer = _answer(body, queued["id"], queued["created_at"], completion)
    await store.update(answer, [*conversation, assistant_message(answer["output"])])


async def _readable(request: Request, response_id: str) -> StoredResponse:
    state: AppState = request.app.state.strata
    row = await _store(state).get(response_id, principal(request).user)
    if row is None:
        raise _missing(response_id)
    return row


@router.get("/responses/{response_id}", summary="A stored response")
async def get_response(response_id: str, request: Request) -> Response:
    row = await _readable(request, response_id)
    state: AppState = request.app.state.strata
    body = await refresh(state, _store(state), row) if row.run_id is not None else row.body
    return _json(body)


@router.delete("/responses/{response_id}", summary="Delete a stored response")
async def delete_response(response_id: str, request: Request) -> Response:
    state: AppState = request.app.state.strata
    if not await _store(state).delete(response_id, principal(request).user):
        raise _missing(response_id)
    return _json({"id": response_id, "object": "response.deleted", "deleted": True})
