"""What the API description says about errors: every route may answer with OpenAI's error shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_WHEN = {
    400: "Invalid request; `param` names the field",
    401: "No credentials, or a key that is unknown, expired or revoked",
    403: "The key's role or grants do not allow this",
    404: "Not found, or not yours",
    413: "The body is larger than limits.max_body_bytes",
    429: "Rate limit or budget reached (see Retry-After)",
    503: "Starting, overloaded or shutting down (see Retry-After)",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _WHEN.items()
}
