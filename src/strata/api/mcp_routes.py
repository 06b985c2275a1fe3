"""Operator view of the MCP servers whose tools agents use: each one's connection state under supervision."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from strata.api.state import AppState

router = APIRouter(tags=["admin"])


@router.get("/admin/mcp-servers", summary="Each MCP server: connection state, tools, reconnects, last error")
async def list_mcp_servers(request: Request) -> Response:
    state: AppState = request.app.state.strata
    data = [server.status().as_dict() for server in state.agent_runtime().tools.mcp_servers]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
