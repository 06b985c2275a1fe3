"""One pooled HTTP client per OpenAI-compatible backend.

aiohttp rather than httpx: its client spends markedly less CPU per request (the gateway's budget is
about 1 ms of CPU per request, see the benchmarks issue), and its pooled connector keeps upstream
connections warm across requests.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver

from strata.config import TimeoutsConfig
from strata.config_loader import format_path
from strata.serving.errors import (
    DeploymentStoppedError,
    ServingError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)

_JSON = "application/json"
REQUEST_ID = "X-Request-ID"
_REQUEST_IDS = uuid.UUID("5b1f3f6e-4a34-4c38-9b8e-2a0c7e0d5e21")  # the namespace of ids made from others


def as_uuid(request_id: str) -> str:
    """A UUID for a backend that takes nothing else: the id itself if it is one, else one derived from it."""
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        return str(uuid.uuid5(_REQUEST_IDS, request_id))


@dataclass(frozen=True)
class UpstreamReply:
    status: int
    body: bytes
    busy_s: float = 0.0  # this request's share of its deployment's busy time (GPU-hour pricing)


class UpstreamStream:
    """An open streaming response. Closing it drops the connection, which tells the backend to stop."""

    def __init__(self, response: aiohttp.ClientResponse, deployment: str, read_timeout_s: float) -> None:
        self._response = response
        self.deployment = deployment
        self.read_timeout_s = read_timeout_s
        self.busy_s = 0.0  # its share of the deployment's busy time, known once it is closed
        self._first: bytes | None = None
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    async def prefetch(self) -> None:
        """Wait for the first chunk, so failures before any byte reached the client can still be retried."""
        async for chunk in self._read():
            self._first = chunk
            return

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for chunk in self._read():
            yield chunk

    async def _read(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await self._response.content.readany():
                yield chunk
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"no data from the backend for {self.read_timeout_s:g}s during the stream",
                deployment=self.deployment,
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError(
                f"the backend's stream broke off: {_describe(exc)}", deployment=self.deployment
            ) from None

    def close(self) -> None:
        if not self._response.closed:
            self._response.close()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()


class OpenAIClient:
    """Talks to one backend's `/v1` API over a pooled aiohttp session."""

    def __init__(
        self,
        deployment: str,
        base_url: str,
        *,
        api_key: str | None,
        timeouts: TimeoutsConfig,
        max_connections: int,
        resolver: AbstractResolver | None = None,
        uuid_request_ids: bool = False,
    ) -> None:
        """`resolver`: judges every DNS answer (an endpoint given over the API); such a client follows no
        redirect either, so it only ever reaches the host that was checked."""
        self.deployment = deployment
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeouts = timeouts
        self._max_connections = max_connections
        self._resolver = resolver
        self._redirects = resolver is None
        self._uuid_request_ids = uuid_request_ids
        self._session: aiohttp.ClientSession | None = None
        self._plain_timeout = aiohttp.ClientTimeout(
            total=timeouts.total_s, connect=timeouts.connect_s, sock_read=timeouts.read_s
        )
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect_s, sock_read=timeouts.read_s)

    def set_endpoint(self, base_url: str, api_key: str | None) -> None:
        """Launched backends may come back on another port or token after a restart."""
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_connections,
            ttl_dns_cache=300,
            resolver=self._resolver,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",), auto_decompress=True
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {"Content-Type": _JSON, "Accept": _JSON}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if extra:
            headers.update(extra)
            request_id = headers.get(REQUEST_ID)
            if self._uuid_request_ids and request_id is not None:
                headers[REQUEST_ID] = as_uuid(request_id)
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise DeploymentStoppedError("the backend client is not started", deployment=self.deployment)
        return self._session

    async def post_json(
        self, path: str, payload: bytes, headers: Mapping[str, str] | None = None, timeout_s: float | None = None
    ) -> UpstreamReply:
        """A non-streaming call below the API base URL; errors come back as `ServingError`s.

        `timeout_s` shortens the total timeout to what is left of the request's deadline."""
        return await self.post_json_url(self.base_url + path, payload, headers, timeout_s)

    async def post_json_url(
        self, url: str, payload: bytes, headers: Mapping[str, str] | None = None, timeout_s: float | None = None
    ) -> UpstreamReply:
        timeout = self._plain_timeout
        if timeout_s is not None and timeout_s < self._timeouts.total_s:
            timeout = aiohttp.ClientTimeout(
                total=timeout_s, connect=self._timeouts.connect_s, sock_read=self._timeouts.read_s
            )
        try:
            async with self.session.post(
                url, data=payload, headers=self._headers(headers), timeout=timeout, allow_redirects=self._redirects
            ) as response:
                body = await response.read()
                if response.status >= 300:  # a redirect not followed is a failure too
                    raise _status_error(response, body, self.deployment)
                return UpstreamReply(response.status, body)
        except ServingError:
            raise
        except TimeoutError:
            raise self._timeout_error() from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError(
                f"cannot reach the backend at {self.base_url}: {_describe(exc)}", deployment=self.deployment
            ) from None

    async def open_stream(self, path: str, payload: bytes, headers: Mapping[str, str] | None = None) -> UpstreamStream:
        """Send a streaming request; returns once the backend answered 200 with its headers."""
        merged = self._headers(headers)
        merged["Accept"] = "text/event-stream"
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self.session.post(
                self.base_url + path,
                data=payload,
                headers=merged,
                timeout=self._stream_timeout,
                allow_redirects=self._redirects,
            )
            if response.status >= 300:
                body = await response.read()
                raise _status_error(response, body, self.deployment)
            return UpstreamStream(response, self.deployment, self._timeouts.read_s)
        except BaseException as exc:
            if response is not None:
                response.close()
            if isinstance(exc, TimeoutError):
                raise self._timeout_error() from None
            if isinstance(exc, aiohttp.ClientError):
                raise UpstreamUnavailableError(
                    f"cannot reach the backend at {self.base_url}: {_describe(exc)}",
                    deployment=self.deployment,
                ) from None
            raise

    async def probe(self, timeout_s: float = 5.0) -> bool:
        """Health: the backend lists its models."""
        try:
            async with self.session.get(
                self.base_url + "/models",
                headers=self._headers(None),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=self._redirects,
            ) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, UpstreamUnavailableError):
            return False

    def _timeout_error(self) -> UpstreamTimeoutError:
        t = self._timeouts
        return UpstreamTimeoutError(
            f"the backend did not answer in time (connect {t.connect_s:g}s, first byte {t.read_s:g}s, "
            f"total {t.total_s:g}s)",
            deployment=self.deployment,
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _status_error(response: aiohttp.ClientResponse, body: bytes, deployment: str) -> UpstreamStatusError:
    upstream_message, param, code = error_fields(body)
    message = upstream_message or f"the backend answered HTTP {response.status}"
    if upstream_message is None:
        snippet = body[:200].decode("utf-8", "replace").strip()
        if snippet:
            message = f"{message}: {snippet}"
    return UpstreamStatusError(
        message,
        status=response.status,
        deployment=deployment,
        param=param,
        upstream_code=code,
        retry_after=response.headers.get("Retry-After"),
        upstream_message=upstream_message,
    )


def error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, param, code) of an error body in the shapes model servers answer; message None if it has none."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    if not isinstance(parsed, dict):
        return None, None, None
    error = parsed.get("error")
    if isinstance(error, dict):  # OpenAI, llama-cpp-python, vLLM
        return _text(error.get("message")), _text(error.get("param")), _text(error.get("code"))
    if isinstance(error, str):  # TGI, some proxies
        return error, None, None
    detail = parsed.get("detail")
    if isinstance(detail, str):  # FastAPI's HTTPException
        return detail, None, None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI's validation errors
        first = detail[0]
        loc = first.get("loc")
        path = tuple(loc[1:] if loc and loc[0] == "body" else loc) if isinstance(loc, list) else ()
        param = format_path(path) or None
        text = str(first.get("msg") or "invalid value")
        return (f"{param}: {text}" if param else text), param, None
    if isinstance(parsed.get("message"), str):  # older vLLM: {"object": "error", "message", "type", "param", "code"}
        return parsed["message"], _text(parsed.get("param")), _text(parsed.get("code"))
    return None, None, None


def answer_object(body: bytes, deployment: str, field: str) -> dict[str, Any]:
    """A backend's 200 answer as a JSON object that has a list under `field` (`choices`, `data`), else a 502."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get(field), list):
        raise UpstreamStatusError(
            f"the backend answered with something that is not a JSON object with '{field}'",
            status=502,
            deployment=deployment,
        )
    return answer


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
