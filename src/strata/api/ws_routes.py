"""`WS /v1/agents/{agent}/ws`: chat with an agent over one socket.

Client -> server: `{"type": "message", "input": "...", "session_id": optional}` starts a run in the
socket's session (the first run creates one); `{"type": "cancel"}` cancels the current run.
Server -> client: the run's events, as in SSE (`{"type", "run_id", "seq", ...}`), and
`{"type": "error", "message"}` for a bad client message (with `code` and `param` for a string that cannot be
stored: a NUL character or a lone surrogate). A message may be at most `limits.max_body_bytes`, the bound of a
REST body: a larger one closes the socket with 1009.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect, WebSocketException, status

from strata.agents.bus import Subscription
from strata.agents.service import AgentService, InvalidRequest, NotFound, RunConflict
from strata.api.auth import principal
from strata.api.chat_accounting import admit_budget
from strata.api.errors import ApiError
from strata.api.state import AppState
from strata.api.strings import bad_json_string

router = APIRouter(tags=["runs"])


@router.websocket("/v1/agents/{agent}/ws")
async def agent_socket(websocket: WebSocket, agent: str) -> None:
    state: AppState = websocket.app.state.strata
    agents = state.agent_service()
    who = principal(websocket)
    if not who.may_use_agent(agent):
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason=f"this key may not run agent {agent!r}")
    await websocket.accept()
    session_id: str | None = None
    current: dict[str, Any] = {"run": None}
    followers: set[asyncio.Task[None]] = set()
    try:
        while True:
            text = await websocket.receive_text()  # at most limits.max_body_bytes: uvicorn closes with 1009 past it
            if bad := bad_json_string(text):
                await _send(websocket, {"type": "error", "code": "unstorable_value", "param": bad.param,
                                        "message": bad.message})  # fmt: skip
                continue
            try:
                message = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                await _send(websocket, {"type": "error", "message": f"not JSON: {exc}"})
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "cancel":
                if current["run"]:
                    await agents.cancel(current["run"])
                continue
            if kind != "message" or not isinstance(message.get("input"), str):
                await _send(websocket, {"type": "error", "message": "expected {'type': 'message', 'input': str}"})
                continue
            try:
                await admit_budget(state, who, agent)
                run, _ = await agents.start_run(
                    agent,
                    {"role": "user", "content": message["input"]},
                    session_id=message.get("session_id") or session_id,
                    idempotency_key=message.get("idempotency_key"),
                    owner=who.user,
                    key_id=who.key_id,
                    models=who.models,
                    wake=False,
                )
            except (NotFound, RunConflict, InvalidRequest) as exc:
                await _send(websocket, {"type": "error", "message": str(exc)})
                continue
            except ApiError as exc:  # a spent budget
                await _send(websocket, {"type": "error", "code": exc.code, "message": exc.message})
                continue
            session_id = run.session_id
            current["run"] = run.id
            subscription = agents.subscribe(run.id)  # before the worker can start it: no delta is missed
            agents.worker.wake()
            follower = asyncio.create_task(_forward(websocket, agents, run.id, subscription))
            followers.add(follower)
            follower.add_done_callback(followers.discard)
    except WebSocketDisconnect:
        pass
    finally:
        for follower in list(followers):
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


async def _forward(
    websocket: WebSocket,
    agents: AgentService,
    run_id: str,
    subscription: Subscription,
) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        async for event in agents.follow(run_id, subscription=subscription):
            await _send(websocket, {"type": event.type, "run_id": event.run_id, "seq": event.seq, **event.data})


async def _send(websocket: WebSocket, payload: dict[str, Any]) -> None:
    await websocket.send_text(orjson.dumps(payload).decode())
