"""`POST /v1/completions` (OpenAI's legacy text completions): to the backend's own completions endpoint, with
the same key checks, budgets, token limits, usage rows and cost as chat; streamed or not."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.chat_accounting import ChatAccount, answer_settled
from strata.api.openai_routes import (
    check_max_tokens,
    check_model_allowed,
    request_id_header,
    stream_settled,
    validated,
)
from strata.api.state import AppState
from strata.serving.schemas import CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions", summary="Create a text completion (OpenAI's legacy completions API)")
async def create_completion(request: Request) -> Response:
    state: AppState = request.app.state.strata
    payload, completion = await validated(request, CompletionRequest, "text-completion")
    check_max_tokens("max_tokens", completion.max_tokens, state.config.limits)
    who = principal(request)
    check_model_allowed(who, completion.model)
    account = ChatAccount(request, completion.model, kind="completions")
    await account.admit()
    service, headers = state.completions, request_id_header()
    if completion.stream:
        opening = service.open_stream(completion, payload, headers, allowed=who.models)
        return await stream_settled(request, account, opening)
    return await answer_settled(request, account, service.complete(completion, payload, headers, allowed=who.models))
