"""Failures of the serving layer, each carrying what a client needs to know: what failed and where.

The API layer maps them onto HTTP statuses; serving itself knows nothing of HTTP responses.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class. `deployment` names the backend that failed, for the error body and the logs."""

    code = "upstream_error"

    def __init__(self, message: str, *, deployment: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.deployment = deployment
        #: Every deployment tried for the request, in order, with what went wrong there.
        self.attempts: list[dict[str, str]] = []


class ModelNotFoundError(ServingError):
    code = "model_not_found"


class RequestNotSupportedError(ServingError):
    """The request asks for something the backend cannot do (`n` > 1 of a server that answers one choice).

    Nothing was sent: the client gets a 400 naming `param`, and no backend is blamed for it."""

    code = "unsupported_parameter"

    def __init__(self, message: str, *, param: str, deployment: str | None = None) -> None:
        super().__init__(message, deployment=deployment)
        self.param = param


class BackendNotReadyError(ServingError):
    """The backend exists but cannot take work now (starting, restarting, stopping)."""

    code = "backend_not_ready"

    def __init__(self, message: str, *, deployment: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, deployment=deployment)
        self.retry_after_s = retry_after_s


class ServerShuttingDownError(BackendNotReadyError):
    """Strata itself is stopping: its shutdown grace ran out while the request was still being answered."""

    code = "server_shutting_down"


class UpstreamUnavailableError(ServingError):
    """Could not connect, or the connection broke before a response arrived."""

    code = "upstream_unavailable"


class DeploymentStoppedError(UpstreamUnavailableError):
    """The deployment was stopped (a hot swap drained it, or shutdown): nothing was sent to the backend."""


class UpstreamTimeoutError(ServingError):
    code = "upstream_timeout"


class UpstreamStatusError(ServingError):
    """The backend answered with an error status; its own message is kept for the client."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        deployment: str | None = None,
        param: str | None = None,
        upstream_code: str | None = None,
        retry_after: str | None = None,
        upstream_message: str | None = None,
    ) -> None:
        super().__init__(message, deployment=deployment)
        self.status = status
        self.param = param
        self.upstream_code = upstream_code
        self.retry_after = retry_after
        #: The error message as the backend wrote it ("" if empty); None when its body held no message.
        self.upstream_message = upstream_message
        #: The status the backend answered; `status` is what the client gets (see `blame_request`).
        self.upstream_status = status
        #: The request, not the backend, is at fault: no retry, not counted by the breaker.
        self.caused_by_request = 400 <= status < 500 and status not in (401, 403, 408, 429)

    def blame_request(self, message: str) -> None:
        """A 5xx the request caused: the client gets it as the 400 it is, with `message`."""
        self.status = 400
        self.message = message
        self.caused_by_request = True


class OverloadedError(BackendNotReadyError):
    """Every deployment that could serve the request is at its limit (admission control refused)."""

    code = "overloaded"


class CircuitOpenError(BackendNotReadyError):
    """Every deployment of the model is failing (breakers open): failing fast, no upstream call."""

    code = "circuit_open"
