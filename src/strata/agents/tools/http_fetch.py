"""The `http_fetch` built-in: GET or HEAD a URL for an agent, without becoming an SSRF hole.

Each hop (the first request and every redirect) is parsed, judged by the egress policy, resolved
exactly once, and every resolved address is judged too. aiohttp then connects through a resolver
that only knows those checked addresses, so a DNS answer that changes between check and connect
(rebinding) cannot send the request elsewhere, while TLS still verifies the real hostname.
"""

from __future__ import annotations

import asyncio
import codecs
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult, ToolRisk, ToolSpec
from strata.config import HttpFetchConfig
from strata.observability.tracing import TRACEPARENT, inject
from strata.security.egress import EgressPolicy, EgressRefused, parse_address
from strata.security.egress_resolver import resolve_results, system_resolver

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""Maps (host, port) to IP address strings. Injectable so tests never touch real DNS."""

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Credentials the model supplied for one origin must not follow a redirect to another.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Host would let a request to an allowed address impersonate a denied domain; there is never a body.
FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
USER_AGENT = "Strata-http_fetch/0.1"
_CHUNK = 64 * 1024

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "description": "Absolute http:// or https:// URL to fetch."},
        "method": {"type": "string", "enum": ["GET", "HEAD"], "default": "GET"},
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Extra request headers, name to value.",
        },
    },
    "required": ["url"],
    "additionalProperties": False,
}


class PinnedResolver(AbstractResolver):
    """aiohttp resolver that answers only from addresses already checked for this fetch."""

    def __init__(self) -> None:
        self._pins: dict[str, tuple[str, ...]] = {}

    def pin(self, host: str, addresses: Sequence[str]) -> None:
        self._pins[_pin_key(host)] = tuple(addresses)

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        addresses = self._pins.get(_pin_key(host))
        if not addresses:
            raise OSError(f"{host} was not checked by the egress policy")
        return resolve_results(host, port, family, addresses)

    async def close(self) -> None:
        self._pins.clear()


def _pin_key(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True)
class _Request:
    url: URL
    method: str
    headers: dict[str, str]


@dataclass(frozen=True)
class FetchResult:
    status: int
    reason: str
    content_type: str
    url: str
    body: str
    body_bytes: int
    truncated: bool
    redirects: int

    def render(self, max_bytes: int) -> str:
        lines = [f"HTTP {self.status} {self.reason}".rstrip(), f"Content-Type: {self.content_type or '(none)'}"]
        lines.append(f"URL: {self.url}")
        if self.truncated:
            lines.append(f"[body truncated: showing the first {max_bytes} bytes]")
        return "\n".join(lines) + "\n\n" + self.body


class HttpFetchTool(Tool):
    """Fetches a URL under the egress policy; refusals and failures raise `ToolError`."""

    def __init__(self, config: HttpFetchConfig, *, resolver: Resolver | None = None) -> None:
        self._config = config
        self._policy = EgressPolicy.from_config(config)
        self._resolve = resolver or system_resolver
        self.spec = ToolSpec(
            name="http_fetch",
            description=(
                "Fetch a public web page or API with GET or HEAD. Returns the status, content type, "
                f"final URL and the body as text (at most {config.max_bytes} bytes). Private, loopback "
                "and cloud-metadata addresses are refused."
            ),
            parameters=PARAMETERS,
            timeout_s=config.timeout_s,
            risk=ToolRisk.MEDIUM,
        )

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        request = _parse_arguments(arguments)
        budget = min(self._config.timeout_s, context.timeout_s)
        try:
            async with asyncio.timeout(budget):
                result = await self._fetch(request)
        except TimeoutError:
            raise ToolError(f"timed out after {budget:g}s fetching {request.url}") from None
        return ToolResult(
            content=result.render(self._config.max_bytes),
            metadata={
                "status": result.status,
                "url": result.url,
                "content_type": result.content_type,
                "bytes": result.body_bytes,
                "truncated": result.truncated,
                "redirects": result.redirects,
            },
        )

    async def _fetch(self, request: _Request) -> FetchResult:
        # A session per fetch: its resolver holds this fetch's pins, and force_close makes every hop
        # open a fresh connection to the address checked for that hop, never a pooled older one.
        pins = PinnedResolver()
        connector = aiohttp.TCPConnector(resolver=pins, use_dns_cache=False, force_close=True)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(),  # unbounded here: invoke() bounds the whole fetch, every hop
            trust_env=False,  # never route through a proxy from the environment
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            url, headers = request.url, dict(request.headers)
            if not any(name.lower() == TRACEPARENT for name in headers):  # the model's own header wins
                inject(headers)  # the tool call's span: the fetched service can join the run's trace
            for hop in range(self._config.max_redirects + 1):
                await self._check_and_pin(url, pins)
                try:
                    async with session.request(request.method, url, headers=headers, allow_redirects=False) as resp:
                        location = resp.headers.get("Location")
                        if resp.status in REDIRECT_STATUSES and location:
                            next_url = _redirect_target(url, location)
                            if _origin(next_url) != _origin(url):
                                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
                            url = next_url
                            continue
                        return await self._read(resp, url, request.method, hop)
                except aiohttp.ClientError as exc:
                    if isinstance(exc, TimeoutError):
                        raise
                    raise ToolError(f"could not fetch {url}: {_describe(exc)}") from None
        raise ToolError(f"refused: more than {self._config.max_redirects} redirects (the next was {url})")

    async def _check_and_pin(self, url: URL, pins: PinnedResolver) -> None:
        """Judge one hop and pin its addresses; the resolver is asked exactly once per hop."""
        if url.scheme not in ("http", "https"):
            raise ToolError(f"refused: only http and https URLs can be fetched, not {url.scheme or 'this'}: {url}")
        host = url.raw_host
        port = url.port
        if not host or port is None:
            raise ToolError(f"refused: {url} has no host")
        try:
            self._policy.require_host(host)
            literal = parse_address(url.host or host)
            if literal is not None:
                self._policy.require_addresses(host, [literal])
                return  # aiohttp connects to a literal directly; there is nothing to pin
            try:
                addresses = list(await self._resolve(host.rstrip("."), port))
            except OSError as exc:
                raise ToolError(f"could not resolve {host}: {exc.strerror or exc}") from None
            self._policy.require_addresses(host, addresses)
        except EgressRefused as exc:
            raise ToolError(exc.verdict.reason) from None
        pins.pin(host, addresses)

    async def _read(self, resp: aiohttp.ClientResponse, url: URL, method: str, redirects: int) -> FetchResult:
        limit = self._config.max_bytes
        chunks: list[bytes] = []
        size, truncated = 0, False
        if method != "HEAD":
            async for chunk in resp.content.iter_chunked(_CHUNK):
                if size + len(chunk) > limit:
                    chunks.append(chunk[: limit - size])
                    size, truncated = limit, True
                    resp.close()  # stop downloading; the connection is not reusable anyway
                    break
                chunks.append(chunk)
                size += len(chunk)
        return FetchResult(
            status=resp.status,
            reason=resp.reason or "",
            content_type=resp.headers.get("Content-Type", ""),
            url=str(url),
            body=_decode(b"".join(chunks), resp.charset),
            body_bytes=size,
            truncated=truncated,
            redirects=redirects,
        )


def _parse_arguments(arguments: dict[str, Any]) -> _Request:
    unknown = set(arguments) - set(PARAMETERS["properties"])
    if unknown:
        raise ToolError(f"unknown argument(s) {sorted(unknown)}; http_fetch takes url, method and headers")
    raw_url = arguments.get("url")
    if not isinstance(raw_url, str) or not raw_url.strip():
        raise ToolError("url is required and must be a string such as https://example.com/")
    try:
        url = URL(raw_url.strip())
    except (ValueError, TypeError) as exc:
        raise ToolError(f"url {raw_url!r} is not a valid URL: {exc}") from None
    if not url.scheme:
        raise ToolError(f"url {raw_url!r} must be absolute, starting with http:// or https://")
    if url.scheme not in ("http", "https"):
        raise ToolError(f"refused: only http and https URLs can be fetched, not {url.scheme}: {raw_url}")
    method = arguments.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in ("GET", "HEAD"):
        raise ToolError(f"method must be GET or HEAD, not {method!r}")
    headers = arguments.get("headers") or {}
    if not isinstance(headers, dict):
        raise ToolError("headers must be an object of header name to string value")
    clean: dict[str, str] = {"User-Agent": USER_AGENT}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ToolError(f"header {name!r} must have a string value")
        if any(c in name + value for c in "\r\n\0"):
            raise ToolError(f"header {name!r} contains a line break or NUL")
        if name.lower() in FORBIDDEN_HEADERS:
            raise ToolError(f"header {name!r} cannot be set; the URL decides the host and GET/HEAD have no body")
        clean = {k: v for k, v in clean.items() if k.lower() != name.lower()}
        clean[name] = value
    return _Request(url=url, method=method.upper(), headers=clean)


def _redirect_target(current: URL, location: str) -> URL:
    try:
        return current.join(URL(location))
    except (ValueError, TypeError) as exc:
        raise ToolError(f"{current} redirected to an invalid URL {location!r}: {exc}") from None


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return (url.scheme, url.raw_host, url.port)


def _decode(body: bytes, charset: str | None) -> str:
    encoding = charset or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        encoding = "utf-8"
    return body.decode(encoding, errors="replace")


def _describe(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"the TLS certificate could not be verified ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"bad response ({exc.message})"
    return str(exc) or type(exc).__name__
