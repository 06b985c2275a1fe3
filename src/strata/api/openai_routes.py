"""OpenAI-compatible routes: `/v1/chat/completions` and `/v1/models`.

The chat route reads the raw body and answers with raw bytes: FastAPI's own body parsing and
response serialisation would cost more than the rest of the request path together.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from strata.api.disconnect import cancel_on_disconnect
from strata.api.errors import ApiError, invalid_body
from strata.api.request_id import current_request_id
from strata.api.state import AppState
from strata.serving.chat import ChatCall
from strata.serving.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def parse_chat(body: bytes, tag: str | None = None) -> ChatCall:
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON chat-completion request")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid_body(exc.errors(include_url=False)) from None
    metadata = payload.get("metadata")
    if tag is None and isinstance(metadata, dict) and isinstance(metadata.get("tag"), str):
        tag = metadata["tag"]
    return ChatCall(request, payload, tag=tag)


@router.post("/chat/completions", summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.strata
    call = parse_chat(await request.body(), request.headers.get("x-strata-tag"))
    request_id = current_request_id()
    headers = {"X-Request-ID": request_id} if request_id else {}
    if call.request.stream:
        relay = await state.chat.open_stream(call, headers)
        return StreamingResponse(relay, media_type="text/event-stream", headers=_SSE_HEADERS)
    body = await cancel_on_disconnect(request, state.chat.complete(call, headers))
    return Response(body, media_type="application/json")


@router.get("/models", summary="List the models this Strata serves")
async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.strata
    created = int(state.started_at)
    data = [{"id": name, "object": "model", "created": created, "owned_by": "strata"} for name in state.router.models]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
