"""`POST /v1/embeddings` (OpenAI-compatible): through the router and dispatcher like chat, with the same key
checks, budgets, token limits, usage rows and cost."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.chat_accounting import ChatAccount, answer_settled
from strata.api.openai_routes import check_model_allowed, request_id_header, validated
from strata.api.state import AppState
from strata.serving.schemas import EmbeddingRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/embeddings", summary="Create embeddings (OpenAI-compatible)")
async def create_embeddings(request: Request) -> Response:
    state: AppState = request.app.state.strata
    payload, embedding = await validated(request, EmbeddingRequest, "embeddings")
    who = principal(request)
    check_model_allowed(who, embedding.model)
    account = ChatAccount(request, embedding.model, kind="embeddings")
    await account.admit()
    work = state.embeddings.create(embedding, payload, request_id_header(), allowed=who.models)
    return await answer_settled(request, account, work)
