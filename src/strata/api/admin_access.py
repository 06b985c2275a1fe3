"""Who may use /admin/*. Until API keys and roles exist, only clients on this machine: a deploy can
launch processes and point Strata's keys at any URL, so it must not be open to the network."""

from __future__ import annotations

from fastapi import Request

from strata.api.errors import ApiError
from strata.api.state import AppState

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


async def local_admin_only(request: Request) -> None:
    state: AppState = request.app.state.strata
    client = request.client.host if request.client else None
    if state.config.server.admin_from_anywhere or client in LOOPBACK:
        return
    raise ApiError(
        403,
        f"/admin is served to loopback clients only (this request came from {client}); "
        "set server.admin_from_anywhere to open it",
        type_="permission_error",
        code="admin_local_only",
    )
