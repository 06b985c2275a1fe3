"""Sessions: a conversation with one agent that lasts across runs."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from strata.api.auth import principal
from strata.api.errors import ApiError
from strata.api.ownership import readable_session, service
from strata.api.views import message_view, session_view

router = APIRouter(tags=["sessions"])


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: str = Field(max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = orjson.dumps(value)
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"cannot be stored as JSON: {exc}") from None
        if len(encoded) > 64_000:
            raise ValueError("is larger than 64 kB")
        return value


@router.post("/v1/sessions", status_code=201, summary="Start a session with an agent")
async def create_session(body: SessionRequest, request: Request) -> Response:
    who = principal(request)
    if not who.may_use_agent(body.agent):
        raise ApiError(
            403, f"this key may not use agent {body.agent!r}", type_="permission_error", code="agent_not_allowed"
        )
    session = await service(request).create_session(body.agent, who.user, body.metadata)
    return Response(orjson.dumps(session_view(session)), status_code=201, media_type="application/json")


@router.get("/v1/sessions/{session_id}", summary="A session")
async def get_session(session_id: str, request: Request) -> Response:
    agents = service(request)
    session = await readable_session(request, session_id)
    view = session_view(session)
    view["active_runs"] = [run.id for run in await agents.store.active_runs(session_id)]
    return Response(orjson.dumps(view), media_type="application/json")


@router.get("/v1/sessions/{session_id}/messages", summary="The session's conversation, oldest first")
async def session_messages(session_id: str, request: Request) -> Response:
    agents = service(request)
    await readable_session(request, session_id)
    data = [message_view(m) for m in await agents.store.messages(session_id)]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
