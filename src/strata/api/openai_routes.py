"""OpenAI-compatible routes: `/v1/chat/completions` and `/v1/models`.

The chat route reads the raw body and answers with raw bytes: FastAPI's own body parsing and
response serialisation would cost more than the rest of the request path together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

import orjson
import structlog
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response, StreamingResponse

from strata.api.auth import principal
from strata.api.chat_accounting import COST_HEADER, ChatAccount
from strata.api.disconnect import cancel_on_disconnect
from strata.api.errors import ApiError, from_serving_error, invalid_body
from strata.api.metrics_middleware import waiting_on_backend
from strata.api.request_id import current_request_id
from strata.api.state import AppState
from strata.api.strings import bad_json_string, has_nul_escape
from strata.config import LimitsConfig
from strata.security.principal import Principal
from strata.serving.chat import ChatCall, Completion
from strata.serving.errors import ServingError
from strata.serving.schemas import ChatCompletionRequest
from strata.serving.stream_relay import ChatStreamRelay
from strata.serving.tool_fields import normalise_tools

router = APIRouter(prefix="/v1", tags=["openai"])
Schema = TypeVar("Schema", bound=BaseModel)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def parse_chat(body: bytes, tag: str | None = None, limits: LimitsConfig | None = None) -> ChatCall:
    payload = normalise_tools(json_object(body, "chat-completion"))
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid_body(exc.errors(include_url=False)) from None
    if limits is not None:
        check_bounds(request, limits)
    metadata = payload.get("metadata")
    if tag is None and isinstance(metadata, dict) and isinstance(metadata.get("tag"), str):
        tag = metadata["tag"]
    return ChatCall(request, payload, tag=tag)


async def validated(request: Request, schema: type[Schema], what: str) -> tuple[dict[str, Any], Schema]:
    """The request's JSON body as it was sent, and checked against `schema`; a 400 naming the field if it is not."""
    payload = json_object(await request.body(), what)
    try:
        return payload, schema.model_validate(payload)
    except ValidationError as exc:
        raise invalid_body(exc.errors(include_url=False)) from None


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong and where."""
    if not body:
        raise ApiError(400, f"the request body is empty; send a JSON {what} request")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        bad = bad_json_string(body)  # orjson refuses a lone surrogate: name its field
        raise (bad.error() if bad else ApiError(400, f"the request body is not valid JSON: {exc}")) from None
    if has_nul_escape(body) and (bad := bad_json_string(body)):
        raise bad.error()
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return payload


def check_bounds(request: ChatCompletionRequest, limits: LimitsConfig) -> None:
    """The deployment's own bounds (`limits:` in the config), tighter than the schema's."""
    if len(request.messages) > limits.max_messages:
        raise ApiError(
            400, f"messages: {len(request.messages)} messages, more than the limit of {limits.max_messages}",
            param="messages",
        )  # fmt: skip
    for name in ("max_tokens", "max_completion_tokens"):
        check_max_tokens(name, getattr(request, name), limits)
    if request.tools and len(request.tools) > limits.max_tools:
        raise ApiError(
            400, f"tools: {len(request.tools)} tools, more than the limit of {limits.max_tools}", param="tools"
        )


def check_model_allowed(who: Principal, model: str) -> None:
    if not who.may_use_model(model):
        raise ApiError(403, f"this key may not use model {model!r}", type_="permission_error", code="model_not_allowed")


def check_max_tokens(name: str, value: int | None, limits: LimitsConfig) -> None:
    if value is not None and value > limits.max_tokens:
        raise ApiError(400, f"{name}: {value} is more than the limit of {limits.max_tokens}", param=name)


@router.post("/chat/completions", summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.strata
    call = parse_chat(await request.body(), request.headers.get("x-strata-tag"), state.config.limits)
    call, account = await admit_chat(request, call)
    answer = await send_chat(request, call, account)
    if isinstance(answer, ChatStreamRelay):
        body = metered(answer, account, state.lifecycle.streams)
        return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)
    usd = account.settle(answer.usage, busy_s=answer.busy_s, served_by=answer.model)
    return Response(answer.body, media_type="application/json", headers={COST_HEADER: f"{usd:.9f}"})


async def admit_chat(request: Request, call: ChatCall) -> tuple[ChatCall, ChatAccount]:
    """The caller's key may use the model (and only its allowed models may stand in), and the budget allows it."""
    model = call.request.model
    structlog.contextvars.bind_contextvars(model=model)
    who = principal(request)
    check_model_allowed(who, model)
    if who.models is not None:
        call = replace(call, allowed=who.models)
    account = ChatAccount(request, model)
    await account.admit()
    return call, account


async def send_chat(request: Request, call: ChatCall, account: ChatAccount) -> Completion | ChatStreamRelay:
    """The call to the backend (a stream if the call asks for one); a failure before any answer is settled here.
    Chat completions and the Responses API both send through here."""
    state: AppState = request.app.state.strata
    headers = request_id_header()
    try:
        with waiting_on_backend(request.scope):
            if call.request.stream:
                return await state.chat.open_stream(call, headers)
            return await cancel_on_disconnect(request, state.chat.complete(call, headers))
    except ServingError as exc:
        account.failed(exc)
        raise


async def stream_settled(request: Request, account: ChatAccount, opening: Awaitable[ChatStreamRelay]) -> Response:
    """A streamed call: open it (a failure before the first byte is an error status), relay it, and settle what it
    used and cost when it ends, however it ends."""
    state: AppState = request.app.state.strata
    try:
        with waiting_on_backend(request.scope):
            relay = await opening
    except ServingError as exc:
        account.failed(exc)
        raise
    body = metered(relay, account, state.lifecycle.streams)
    return StreamingResponse(body, media_type="text/event-stream", headers=_SSE_HEADERS)


def request_id_header() -> dict[str, str]:
    """The request's id for the backend's logs."""
    request_id = current_request_id()
    return {"X-Request-ID": request_id} if request_id else {}


async def metered(
    relay: ChatStreamRelay, account: ChatAccount, open_streams: set[ChatStreamRelay]
) -> AsyncIterator[bytes]:
    open_streams.add(relay)  # so that a shutdown whose grace runs out ends it with an error event
    try:
        async for chunk in relay:
            yield chunk
    finally:  # also when the client went away: the backend did the work
        open_streams.discard(relay)
        stats = relay.stats
        error = stats.error
        account.settle(
            stats.usage,
            status=200 if error is None else from_serving_error(error).status,
            error_type="" if error is None else error.code,
            ttft_s=stats.ttft_s(account.started),
            tpot_s=stats.tpot_s(),
            busy_s=relay.busy_s,
            served_by=relay.model,
        )
        if error is not None:
            account.stream_failed(error, relay.deployment, stats.chunks)


@router.get("/models", summary="List the models this Strata serves (those the caller's key may use)")
async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.strata
    who = principal(request)
    data = [_model_object(state, name) for name in state.router.models if who.may_use_model(name)]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/models/{model_id:path}", summary="One model (404 for a model the caller's key may not use)")
async def retrieve_model(model_id: str, request: Request) -> Response:
    state: AppState = request.app.state.strata
    if model_id not in state.router.models or not principal(request).may_use_model(model_id):
        # the same answer for both: a key must not learn which models exist beyond its own
        raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
    return Response(orjson.dumps(_model_object(state, model_id)), media_type="application/json")


def _model_object(state: AppState, name: str) -> dict[str, Any]:
    """OpenAI's model object, plus Strata's `kind` (the backend kind, or "route") and the `endpoints` it answers."""
    model: dict[str, Any] = {"id": name, "object": "model", "created": int(state.started_at), "owned_by": "strata"}
    if state.router.is_model(name):
        deployment = state.router.pool(name).deployments[0]
        model["kind"] = deployment.kind
        model["endpoints"] = [f"/v1{path}" for path in sorted(deployment.serves)]
    else:
        model["kind"] = "route"
    return model
