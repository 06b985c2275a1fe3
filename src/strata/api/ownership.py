"""Users see only their own sessions and runs. Others' look like they do not exist (404), so ids
cannot be probed; roles that may see everyone's data do, and such a read goes to the audit trail."""

from __future__ import annotations

from fastapi import Request

from strata.agents.service import AgentService, NotFound
from strata.api.auth import audit, principal
from strata.api.state import AppState
from strata.security.principal import Principal
from strata.security.rbac import Permission
from strata.store.tables import Run, Session


def service(request: Request) -> AgentService:
    state: AppState = request.app.state.strata
    return state.agent_service()


def _check(request: Request, who: Principal, owner: str | None, resource: str, *, write: bool) -> None:
    if owner == who.user:
        return
    allowed = who.may(Permission.RUNS_WRITE_ALL if write else Permission.RUNS_READ_ALL)
    if not allowed:
        raise NotFound(f"no {resource}")
    action = "data.write_other_user" if write else "data.read_other_user"
    audit(request, action, resource, {"owner": owner, "method": request.method, "path": request.url.path})


async def readable_run(request: Request, run_id: str) -> Run:
    run = await service(request).run(run_id)
    _check(request, principal(request), run.owner, f"run {run_id!r}", write=False)
    return run


async def writable_run(request: Request, run_id: str) -> Run:
    run = await service(request).run(run_id)
    _check(request, principal(request), run.owner, f"run {run_id!r}", write=True)
    return run


async def readable_session(request: Request, session_id: str) -> Session:
    session = await service(request).session(session_id)
    _check(request, principal(request), session.owner, f"session {session_id!r}", write=False)
    return session
