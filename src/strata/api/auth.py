"""Authentication, per-key request rate limits and route permissions.

`AuthMiddleware` (pure ASGI, it runs on every request) authenticates everything but the public
paths — unknown paths included, so nothing answers a caller without credentials — and counts the
key's request against its requests-per-minute limit. A request without a key in its headers may carry the
console's session cookie instead (`api/cookie_auth.py`: a write must also pass its CSRF check).
`authorize`, a dependency of every route, checks the route's permission from `api/permissions.py` and,
for routes that spend tokens, the key's tokens-per-minute limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import WebSocketException, status
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strata.api.cookie_auth import csrf_problem, session_key
from strata.api.errors import ApiError, error_response
from strata.api.permissions import PUBLIC, PUBLIC_PREFIXES, STARTUP_PROBES, Policy
from strata.api.request_id import current_request_id
from strata.observability.request_metrics import RequestMetrics
from strata.observability.tracing import set_principal
from strata.security.audit import AuditRecord
from strata.security.audit_log import AuditBacklogFull, AuditLog
from strata.security.authenticator import Authenticator, AuthError, AuthUnavailable
from strata.security.principal import Principal
from strata.security.rate_limit import LimitDecision, RateLimiter, ratelimit_headers
from strata.security.rbac import Permission

log = structlog.get_logger("strata.auth")
PRINCIPAL = "strata.principal"
EXTRA_HEADERS = "strata.headers"
_AUTHORIZATION = b"authorization"
_API_KEY = b"x-api-key"
_SPENDS_TOKENS = frozenset({Permission.MODELS_INVOKE, Permission.AGENTS_INVOKE})


@dataclass
class Guard:
    """The security services a request passes through; built in the app's lifespan."""

    auth: Authenticator
    limiter: RateLimiter
    audit: AuditLog
    public_paths: frozenset[str]
    policies: dict[Any, Policy]
    default_rpm: int | None = None
    default_tpm: int | None = None
    metrics: RequestMetrics | None = None
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def count_tokens(self, who: Principal, tokens: int) -> None:
        """After an answer: charge its tokens to the key's tokens-per-minute window, off the response path."""
        tpm = who.tpm or self.default_tpm
        if not tpm or tokens <= 0:
            return
        task = asyncio.create_task(self.limiter.add_tokens(who.key_id or f"user:{who.user}", tpm, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _record_failure(guard: Guard, scope: Scope, exc: AuthError) -> None:
    record = AuditRecord(
        action="auth.failed",
        outcome="failure",
        actor="anonymous",
        actor_role=None,
        resource=f"{scope.get('method', 'WS')} {scope['path']}",
        source_ip=source_ip(scope),
        request_id=current_request_id(),
        details={"reason": exc.code},
    )
    try:
        guard.audit.record(record)
    except AuditBacklogFull:
        log.error("audit backlog full: an authentication failure is logged here only", reason=exc.code)


def principal(connection: HTTPConnection) -> Principal:
    return connection.scope[PRINCIPAL]  # type: ignore[no-any-return]


def source_ip(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def credential(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _AUTHORIZATION:
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if name == _API_KEY:
            return value.decode("latin-1").strip()
    if scope["type"] == "websocket":  # browsers cannot set headers on a WebSocket
        for part in scope.get("query_string", b"").decode("latin-1").split("&"):
            name, _, value = part.partition("=")
            if name == "access_token":
                return value
    return None


async def authenticate(guard: Guard, scope: Scope, key: str | None) -> Principal:
    """The key's principal, or the ApiError to answer: 503 when credentials cannot be checked now, 401 (audited)
    when they are wrong. The middleware and the console's login both ask here."""
    try:
        return await guard.auth.authenticate(key)
    except AuthUnavailable as exc:
        raise ApiError(503, f"cannot check credentials now: {exc}", type_="server_error",
                       code="auth_unavailable", headers={"Retry-After": "10"}) from None  # fmt: skip
    except AuthError as exc:
        _record_failure(guard, scope, exc)
        raise ApiError(401, str(exc), type_="authentication_error", code=exc.code,
                       headers={"WWW-Authenticate": 'Bearer realm="strata"'}) from None  # fmt: skip


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        guard: Guard | None = scope["app"].state.strata.guard
        path = scope["path"]
        if guard is None or path in guard.public_paths or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)  # `authorize` answers 503 while starting
            return
        key = credential(scope)
        if key is None and (key := session_key(scope)) is not None and (problem := csrf_problem(scope)):
            await refuse(scope, receive, send, ApiError(403, problem, type_="permission_error", code="csrf_failed"))
            return
        try:
            who = await authenticate(guard, scope, key)
        except ApiError as error:
            await refuse(scope, receive, send, error)
            return
        scope[PRINCIPAL] = who
        set_principal(who.user, who.key_id, who.role)  # on the request's span, and key_id on its log lines
        decision = await guard.limiter.hit_request(who.key_id or f"user:{who.user}", who.rpm or guard.default_rpm)
        headers = ratelimit_headers(decision, None) if decision.limit else {}
        if not decision.allowed:
            if guard.metrics is not None:
                guard.metrics.rate_limited("requests")
            error = ApiError(
                429,
                f"rate limit reached: {decision.limit} requests per minute for this key; "
                f"retry in {decision.retry_after_s} s",
                type_="rate_limit_error",
                code="rate_limit_requests",
                headers={**headers, "Retry-After": str(decision.retry_after_s)},
            )
            await refuse(scope, receive, send, error)
            return
        extra: dict[str, str] = scope.setdefault(EXTRA_HEADERS, {})
        extra.update(headers)
        if scope["type"] == "websocket" or not (who.rpm or who.tpm or guard.default_rpm or guard.default_tpm):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and extra:
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend((k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def authorize(connection: HTTPConnection) -> None:
    """Every route's dependency: its declared permission, and the tokens-per-minute limit."""
    scope = connection.scope
    guard: Guard | None = connection.app.state.strata.guard
    if guard is None:  # still starting (api/starting.py): only the probes answer
        if scope["path"] in STARTUP_PROBES:
            return
        raise ApiError(503, "Strata is starting; try again shortly", type_="server_error", headers={"Retry-After": "1"})
    policy = guard.policies.get(scope.get("endpoint"))
    if policy is PUBLIC:
        return
    who: Principal | None = scope.get(PRINCIPAL)
    if who is None or policy is None:  # a public path that is not a public route: refuse, never open
        _deny(connection, "this route takes no anonymous requests", 401)
    assert isinstance(policy, Permission) and who is not None
    if not who.may(policy):
        resource = f"{scope.get('method', 'WS')} {scope['path']}"
        audit(connection, "access.denied", resource, {"permission": policy.value}, outcome="denied")
        _deny(connection, f"role {who.role!r} lacks the permission {policy.value!r} this route needs", 403)
    if policy in _SPENDS_TOKENS:
        tpm = who.tpm or guard.default_tpm
        if tpm:
            decision = await guard.limiter.check_tokens(who.key_id or f"user:{who.user}", tpm)
            headers = ratelimit_headers(None, decision)
            scope.setdefault(EXTRA_HEADERS, {}).update(headers)
            if not decision.allowed:
                if guard.metrics is not None:
                    guard.metrics.rate_limited("tokens")
                _too_many_tokens(connection, decision, headers)


def _too_many_tokens(connection: HTTPConnection, decision: LimitDecision, headers: dict[str, str]) -> None:
    message = (
        f"rate limit reached: {decision.limit} tokens per minute for this key; retry in {decision.retry_after_s} s"
    )
    if connection.scope["type"] == "websocket":
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason=message[:120])
    raise ApiError(
        429,
        message,
        type_="rate_limit_error",
        code="rate_limit_tokens",
        headers={**headers, "Retry-After": str(decision.retry_after_s)},
    )


def _deny(connection: HTTPConnection, message: str, status_code: int) -> None:
    if connection.scope["type"] == "websocket":
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason=message[:120])
    if status_code == 401:
        raise ApiError(401, message, type_="authentication_error", code="missing_credentials")
    raise ApiError(403, message, type_="permission_error", code="forbidden")


async def refuse(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    """Answer `error` before any route runs: an HTTP error response, or a refused WebSocket handshake."""
    response = error_response(error)
    if scope["type"] == "http":
        await response(scope, receive, send)
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": status.WS_1008_POLICY_VIOLATION})


def audit(
    connection: HTTPConnection,
    action: str,
    resource: str | None,
    details: dict[str, Any] | None = None,
    outcome: str = "success",
) -> None:
    """Record what the calling principal did (the route has authenticated it)."""
    who = principal(connection)
    guard: Guard = connection.app.state.strata.guard
    guard.audit.record(
        AuditRecord(
            action=action,
            outcome=outcome,  # type: ignore[arg-type]
            actor=who.label,
            actor_role=who.role,
            resource=resource,
            source_ip=source_ip(connection.scope),
            request_id=current_request_id(),
            details=details or {},
        )
    )


def audit_change(
    connection: HTTPConnection,
    action: str,
    resource: str,
    before: Any,
    after: Any,
    *,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
) -> None:
    """Record a change of something in service (a model version, the config, an agent): who, and the
    state before and after (after is None when the change was refused or failed)."""
    audit(connection, action, resource, {"before": before, "after": after, **(details or {})}, outcome)
