"""Every error a client sees has OpenAI's shape and the status codes of ARCHITECTURE.md.

`{"error": {"type", "code", "message", "param", "request_id"}}`; no stack trace ever leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from strata.agents.service import Forbidden, InvalidRequest, NotFound, RunConflict
from strata.api.request_id import current_request_id
from strata.config_loader import format_path
from strata.security.audit_log import AuditBacklogFull
from strata.security.redaction import Redactor
from strata.serving.errors import (
    BackendNotReadyError,
    ModelNotFoundError,
    RequestNotSupportedError,
    ServingError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from strata.store.errors import is_data_error

log = structlog.get_logger("strata.api")
SHAPES = Redactor()  # credentials recognisable by their shape; the app adds the configured secrets


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}


def error_response(error: ApiError, redactor: Redactor = SHAPES) -> Response:
    body: dict[str, Any] = {
        "type": error.type,
        "code": error.code,
        "message": redactor.text(error.message),  # upstream messages may echo credentials
        "param": error.param,
        "request_id": current_request_id(),
    }
    body.update(error.extra)
    headers = dict(error.headers)
    if body["request_id"]:  # set here too: a 500 is answered outside the request-id middleware
        headers.setdefault("X-Request-ID", body["request_id"])
    return Response(
        orjson.dumps({"error": body}),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


def from_serving_error(exc: ServingError) -> ApiError:
    extra: dict[str, Any] = {"deployment": exc.deployment} if exc.deployment else {}
    if exc.attempts:
        extra["attempts"] = exc.attempts
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, exc.message, code=exc.code, param="model")
    if isinstance(exc, RequestNotSupportedError):
        return ApiError(400, exc.message, code=exc.code, param=exc.param, extra=extra)
    if isinstance(exc, BackendNotReadyError):
        retry = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        return ApiError(503, exc.message, type_="server_error", code=exc.code, headers=retry, extra=extra)
    if isinstance(exc, UpstreamTimeoutError):
        return ApiError(504, exc.message, type_="server_error", code=exc.code, extra=extra)
    if isinstance(exc, UpstreamStatusError):
        return _from_upstream_status(exc, extra)
    if isinstance(exc, UpstreamUnavailableError):
        return ApiError(502, exc.message, type_="server_error", code=exc.code, extra=extra)
    return ApiError(502, exc.message, type_="server_error", code=exc.code, extra=extra)


def _from_upstream_status(exc: UpstreamStatusError, extra: dict[str, Any]) -> ApiError:
    retry = {"Retry-After": exc.retry_after} if exc.retry_after else {}
    if exc.status in (401, 403):
        # The client's credentials are Strata's business; this is Strata's own key being refused.
        return ApiError(
            502,
            f"the backend refused Strata's credentials (HTTP {exc.status}): {exc.message}",
            type_="server_error",
            code="upstream_auth_failed",
            extra=extra,
        )
    if exc.status == 429:
        return ApiError(
            429,
            exc.message,
            type_="rate_limit_error",
            code="upstream_rate_limited",
            headers=retry or {"Retry-After": "1"},
            extra=extra,
        )
    if 400 <= exc.status < 500:
        status = 400 if exc.status in (404, 405, 422) else exc.status
        return ApiError(
            status,
            exc.message,
            code=exc.upstream_code or "upstream_rejected_request",
            param=exc.param,
            extra=extra,
        )
    if exc.status == 503:
        return ApiError(
            503,
            exc.message,
            type_="server_error",
            code="upstream_overloaded",
            headers=retry or {"Retry-After": "1"},
            extra=extra,
        )
    return ApiError(
        502,
        f"the backend failed (HTTP {exc.status}): {exc.message}",
        type_="server_error",
        code="upstream_error",
        extra=extra,
    )


_respond = error_response


def install_error_handlers(app: FastAPI, redactor: Redactor = SHAPES) -> None:
    def error_response(error: ApiError) -> Response:
        return _respond(error, redactor)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if exc.status >= 500:
            log.error(
                "request failed",
                status=exc.status,
                code=exc.code,
                error=exc.message,
                path=request.url.path,
                **exc.extra,
            )
        return error_response(exc)

    async def on_serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return await on_api_error(request, from_serving_error(exc))

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail) if exc.status_code != 404 else f"no route for {request.method} {request.url.path}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(invalid_body(exc.errors(), skip=1))  # FastAPI's locations start with "body"

    async def on_agent_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, NotFound):
            return error_response(ApiError(404, str(exc), code="not_found"))
        if isinstance(exc, RunConflict):
            return error_response(ApiError(409, str(exc), code=exc.code, extra={"run_id": exc.active_run}))
        if isinstance(exc, Forbidden):
            return error_response(ApiError(403, str(exc), type_="permission_error", code=exc.code))
        assert isinstance(exc, InvalidRequest)
        return error_response(ApiError(400, str(exc), param=exc.param))

    async def on_audit_backlog(request: Request, exc: Exception) -> Response:
        log.error("audit trail backlog full; refusing work until it drains", path=request.url.path)
        return error_response(
            ApiError(503, "the audit trail cannot keep up; try again shortly", type_="server_error",
                     code="audit_backlog", headers={"Retry-After": "5"})
        )  # fmt: skip

    async def on_unstorable(request: Request, exc: Exception) -> Response:
        # The database refused a value (a NUL character, a number or date beyond its range): the
        # client's input, not our failure.
        log.info("a value could not be stored", path=request.url.path, error=type(exc).__name__)
        return error_response(
            ApiError(400, "a value in the request is out of range or contains characters that cannot be stored",
                     code="unstorable_value")
        )  # fmt: skip

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        log.info("client disconnected; request abandoned", path=request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", path=request.url.path)
        return error_response(
            ApiError(
                500,
                "internal error; see the server log for this request id",
                type_="server_error",
                code="internal_error",
            )
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ServingError, on_serving_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for agent_error in (NotFound, RunConflict, InvalidRequest):
        app.add_exception_handler(agent_error, on_agent_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(AuditBacklogFull, on_audit_backlog)

    async def on_database_error(request: Request, exc: Exception) -> Response:
        if is_data_error(exc):
            return await on_unstorable(request, exc)
        return await on_unexpected(request, exc)

    app.add_exception_handler(DBAPIError, on_database_error)
    app.add_exception_handler(OverflowError, on_unstorable)
    app.add_exception_handler(Exception, on_unexpected)


def invalid_body(errors: Sequence[Any], *, skip: int = 0) -> ApiError:
    """A 400 for the first of pydantic's errors, naming the offending field the way users write it."""
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    param = format_path(tuple(first["loc"])[skip:]) or None
    message = "required field is missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param)
