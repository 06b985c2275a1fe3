"""http_fetch against a real local server: what it returns, and every way it refuses to be an SSRF hole.

Nothing here leaves the machine: the only server is on 127.0.0.1, names resolve through a fake DNS,
and refused addresses are refused before any connection is attempted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from strata.agents.tools.base import ToolContext, ToolError, ToolResult, ToolRisk
from strata.agents.tools.http_fetch import HttpFetchTool
from strata.config import HttpFetchConfig

CONTEXT = ToolContext(run_id="run-1", idempotency_key="run-1:1:1", timeout_s=30.0)
LOCAL = ["127.0.0.1/32"]


@dataclass
class Server:
    port: int
    requests: list[web.Request] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class FakeDNS:
    """Resolver stand-in: each name answers from its list of answers, one per call (the last repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        queue = self.answers.get(host)
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    released = asyncio.Event()
    state = Server(port=0)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        state.requests.append(request)
        return await handler(request)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from the test server")

    async def to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["target"])

    async def hop1(request: web.Request) -> web.Response:
        raise web.HTTPFound("/hop2")

    async def hop2(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/hello")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 10_000, content_type="text/plain")

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        while not released.is_set():
            await response.write(b"y" * 4096)
            await asyncio.sleep(0)
        return response

    async def hang(request: web.Request) -> web.Response:
        await released.wait()
        return web.Response(text="too late")

    async def latin1(request: web.Request) -> web.Response:
        return web.Response(body="café crème".encode("latin-1"), content_type="text/plain", charset="iso-8859-1")

    async def broken_utf8(request: web.Request) -> web.Response:
        return web.Response(body=b"ok \xff\xfe end", content_type="text/plain", charset="utf-8")

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    app = web.Application(middlewares=[record])
    for path, handler in [
        ("/hello", hello),
        ("/to", to),
        ("/hop1", hop1),
        ("/hop2", hop2),
        ("/big", big),
        ("/endless", endless),
        ("/hang", hang),
        ("/latin1", latin1),
        ("/broken-utf8", broken_utf8),
        ("/headers", headers),
    ]:
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    released.set()
    await runner.cleanup()


def make_tool(dns: FakeDNS | None = None, **config: Any) -> HttpFetchTool:
    return HttpFetchTool(HttpFetchConfig(**config), resolver=dns)


async def fetch(tool: HttpFetchTool, url: str, **arguments: Any) -> ToolResult:
    return await tool.invoke({"url": url, **arguments}, CONTEXT)


async def refused(tool: HttpFetchTool, url: str, **arguments: Any) -> str:
    with pytest.raises(ToolError) as caught:
        await fetch(tool, url, **arguments)
    return str(caught.value)


# --- what a user gets ---------------------------------------------------------------------------


def test_spec_describes_the_tool() -> None:
    spec = make_tool(timeout_s=7).spec
    assert (spec.name, spec.risk, spec.timeout_s) == ("http_fetch", ToolRisk.MEDIUM, 7)
    assert spec.parameters["required"] == ["url"]
    assert spec.parameters["properties"]["method"]["enum"] == ["GET", "HEAD"]
    assert spec.openai_schema()["function"]["name"] == "http_fetch"


async def test_local_server_body_is_returned_with_status_type_and_url(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL), server.url("/hello"))
    assert not result.is_error
    assert result.content.startswith("HTTP 200 OK\nContent-Type: text/plain; charset=utf-8\n")
    assert f"URL: {server.url('/hello')}" in result.content
    assert result.content.endswith("\n\nhello from the test server")
    assert result.metadata["status"] == 200 and result.metadata["truncated"] is False


async def test_head_returns_status_without_a_body(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL), server.url("/hello"), method="head")
    assert result.content.startswith("HTTP 200 OK")
    assert "hello from the test server" not in result.content
    assert server.requests[-1].method == "HEAD"


async def test_redirect_chain_within_the_allowed_server_is_followed(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL), server.url("/hop1"))
    assert result.content.endswith("hello from the test server")
    assert f"URL: {server.url('/hello')}" in result.content
    assert result.metadata["redirects"] == 2
    assert [r.path for r in server.requests] == ["/hop1", "/hop2", "/hello"]


async def test_more_redirects_than_allowed_is_refused(server: Server) -> None:
    message = await refused(make_tool(allow_networks=LOCAL, max_redirects=1), server.url("/hop1"))
    assert "more than 1 redirects" in message
    assert [r.path for r in server.requests] == ["/hop1", "/hop2"]


async def test_body_over_max_bytes_is_cut_and_marked(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL, max_bytes=100), server.url("/big"))
    assert "[body truncated: showing the first 100 bytes]" in result.content
    assert result.content.endswith("\n\n" + "x" * 100)
    assert result.metadata["truncated"] is True and result.metadata["bytes"] == 100


async def test_body_exactly_max_bytes_is_not_marked_truncated(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL, max_bytes=10_000), server.url("/big"))
    assert "truncated" not in result.content
    assert result.content.endswith("x" * 10_000)


async def test_endless_body_stops_at_max_bytes_instead_of_running_to_the_timeout(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL, max_bytes=50_000, timeout_s=30), server.url("/endless"))
    assert result.metadata["truncated"] is True
    assert result.content.endswith("y" * 50_000)


async def test_hanging_server_times_out_with_a_clear_error(server: Server) -> None:
    async with asyncio.timeout(20):  # fail here, not at pytest's timeout, if the tool has no deadline
        message = await refused(make_tool(allow_networks=LOCAL, timeout_s=0.5), server.url("/hang"))
    assert message.startswith("timed out after 0.5s")


async def test_a_shorter_deadline_from_the_engine_wins(server: Server) -> None:
    tool = make_tool(allow_networks=LOCAL, timeout_s=30)
    context = ToolContext(run_id="run-1", idempotency_key="run-1:1:1", timeout_s=0.3)
    async with asyncio.timeout(5):
        with pytest.raises(ToolError, match=r"timed out after 0\.3s"):
            await tool.invoke({"url": server.url("/hang")}, context)


async def test_body_is_decoded_with_the_declared_charset(server: Server) -> None:
    tool = make_tool(allow_networks=LOCAL)
    assert (await fetch(tool, server.url("/latin1"))).content.endswith("café crème")
    assert (await fetch(tool, server.url("/broken-utf8"))).content.endswith("ok \ufffd\ufffd end")


async def test_connection_refused_is_a_tool_error(server: Server) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    message = await refused(make_tool(allow_networks=LOCAL), f"http://127.0.0.1:{free_port}/")
    assert message.startswith(f"could not fetch http://127.0.0.1:{free_port}/: connection failed")


async def test_unknown_name_is_a_tool_error() -> None:
    dns = FakeDNS({})
    message = await refused(make_tool(dns), "http://nowhere.test/")
    assert message.startswith("could not resolve nowhere.test")


async def test_user_headers_are_sent(server: Server) -> None:
    result = await fetch(make_tool(allow_networks=LOCAL), server.url("/headers"), headers={"X-Trace": "abc"})
    assert '"X-Trace": "abc"' in result.content


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({}, "url is required"),
        ({"url": 42}, "url is required"),
        ({"url": "example.com/page"}, "must be absolute"),
        ({"url": "http://x.test/", "method": "POST"}, "GET or HEAD"),
        ({"url": "http://x.test/", "headers": ["a"]}, "headers must be an object"),
        ({"url": "http://x.test/", "headers": {"A": 1}}, "string value"),
        ({"url": "http://x.test/", "headers": {"X": "a\r\nInjected: 1"}}, "line break"),
        ({"url": "http://x.test/", "headers": {"Host": "internal"}}, "cannot be set"),
        ({"url": "http://x.test/", "body": "x"}, "unknown argument"),
    ],
)
async def test_bad_arguments_are_explained(arguments: dict[str, Any], fragment: str) -> None:
    dns = FakeDNS({"x.test": [["127.0.0.1"]]})
    with pytest.raises(ToolError, match=fragment):
        await make_tool(dns, allow_networks=LOCAL).invoke(arguments, CONTEXT)
    assert dns.calls == []


# --- SSRF: refused, and the target never sees a request ----------------------------------------


async def test_loopback_server_is_refused_without_allow_networks(server: Server) -> None:
    message = await refused(make_tool(), server.url("/hello"))
    assert message == "refused: 127.0.0.1 is a loopback address"
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://[::1]:{port}/hello", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/hello", "IPv4-mapped IPv6 address for 127.0.0.1, a loopback address"),
        ("http://127.0.0.2:{port}/hello", "loopback"),
        ("http://10.0.0.1/", "10.0.0.1 is a private address (RFC 1918)"),
        ("http://192.168.1.1/", "192.168.1.1 is a private address (RFC 1918)"),
        ("http://172.16.5.4/", "private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address (cloud metadata)"),
        ("http://[fd00::1]/", "unique local IPv6 address (ULA)"),
        ("http://[fe80::1]/", "link-local"),
        ("http://0.0.0.0:{port}/", "unspecified"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
    ],
)
async def test_non_public_address_literals_are_refused(server: Server, url: str, fragment: str) -> None:
    dns = FakeDNS({})
    message = await refused(make_tool(dns, timeout_s=2), url.format(port=server.port))
    assert message.startswith("refused: ")
    assert fragment in message
    assert server.requests == [] and dns.calls == []


async def test_localhost_is_refused_through_the_system_resolver(server: Server) -> None:
    message = await refused(make_tool(), server.url("/hello", host="localhost"))
    assert message.startswith("refused: localhost resolves to ")
    assert "loopback" in message
    assert server.requests == []


async def test_name_resolving_to_loopback_is_refused(server: Server) -> None:
    dns = FakeDNS({"sneaky.test": [["127.0.0.1"]]})
    message = await refused(make_tool(dns), server.url("/hello", host="sneaky.test"))
    assert message == "refused: sneaky.test resolves to 127.0.0.1, a loopback address"
    assert server.requests == []


async def test_name_is_refused_if_any_of_its_addresses_is_blocked(server: Server) -> None:
    dns = FakeDNS({"mixed.test": [["127.0.0.1", "169.254.169.254"]]})
    message = await refused(make_tool(dns, allow_networks=LOCAL), server.url("/hello", host="mixed.test"))
    assert "169.254.169.254, a link-local address (cloud metadata)" in message
    assert server.requests == []


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("http://10.0.0.1/admin", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254 is a link-local address (cloud metadata)"),
        ("http://127.0.0.2:{port}/hello", "127.0.0.2 is a loopback address"),
        ("http://[::1]:{port}/hello", "::1 is a loopback address"),
        ("http://internal.test/", "internal.test resolves to 192.168.1.10, a private address"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
async def test_redirect_to_a_blocked_target_is_refused(server: Server, target: str, fragment: str) -> None:
    dns = FakeDNS({"internal.test": [["192.168.1.10"]]})
    url = server.url("/to") + "?target=" + target.format(port=server.port)
    message = await refused(make_tool(dns, allow_networks=LOCAL, timeout_s=2), url)
    assert message.startswith("refused: ")
    assert fragment in message
    assert [r.path for r in server.requests] == ["/to"]


async def test_deny_listed_domain_is_refused_before_resolving() -> None:
    dns = FakeDNS({"api.evil.test": [["93.184.216.34"]]})
    message = await refused(make_tool(dns, deny_domains=["evil.test"]), "https://api.evil.test/data")
    assert message == "refused: api.evil.test is on the deny list (evil.test)"
    assert dns.calls == []


async def test_allow_list_admits_its_subdomains_and_refuses_the_rest(server: Server) -> None:
    dns = FakeDNS({"api.good.test": [["127.0.0.1"]], "other.test": [["127.0.0.1"]]})
    tool = make_tool(dns, allow_domains=["good.test"], allow_networks=LOCAL)
    message = await refused(tool, server.url("/hello", host="other.test"))
    assert message == "refused: other.test is not on the domain allow list"
    assert dns.calls == [] and server.requests == []
    result = await fetch(tool, server.url("/hello", host="api.good.test"))
    assert result.content.endswith("hello from the test server")


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://files.example.test/pub/x", "gopher://127.0.0.1:70/", "javascript:alert(1)"]
)
async def test_non_http_schemes_are_refused(url: str) -> None:
    dns = FakeDNS({})
    message = await refused(make_tool(dns, allow_networks=LOCAL), url)
    assert message.startswith("refused: only http and https URLs can be fetched")
    assert dns.calls == []


# --- pinning: resolve once per hop, connect to what was checked ---------------------------------


async def test_name_is_resolved_once_and_the_connection_goes_to_the_checked_address(server: Server) -> None:
    # A rebinding DNS: the first answer passes the check, any later one points at a private host.
    dns = FakeDNS({"app.test": [["127.0.0.1"], ["10.255.255.1"]]})
    result = await fetch(make_tool(dns, allow_networks=LOCAL, timeout_s=3), server.url("/hello", host="app.test"))
    assert result.content.endswith("hello from the test server")
    assert dns.calls == [("app.test", server.port)]
    # The request reached the checked address while still naming the real host (as TLS SNI would).
    assert server.requests[0].host == f"app.test:{server.port}"


async def test_every_redirect_hop_is_resolved_and_checked_again(server: Server) -> None:
    dns = FakeDNS({"app.test": [["127.0.0.1"]]})
    result = await fetch(make_tool(dns, allow_networks=LOCAL), server.url("/hop1", host="app.test"))
    assert result.content.endswith("hello from the test server")
    assert dns.calls == [("app.test", server.port)] * 3


async def test_rebinding_between_redirect_hops_is_refused(server: Server) -> None:
    dns = FakeDNS({"app.test": [["127.0.0.1"], ["10.0.0.7"]]})
    message = await refused(make_tool(dns, allow_networks=LOCAL, timeout_s=2), server.url("/hop1", host="app.test"))
    assert message == "refused: app.test resolves to 10.0.0.7, a private address (RFC 1918)"
    assert [r.path for r in server.requests] == ["/hop1"]


async def test_credentials_do_not_follow_a_redirect_to_another_origin(server: Server) -> None:
    dns = FakeDNS({"app.test": [["127.0.0.1"]]})
    url = server.url("/to", host="app.test") + "?target=" + server.url("/headers")
    result = await fetch(
        make_tool(dns, allow_networks=LOCAL), url, headers={"Authorization": "Bearer s3cret", "X-Keep": "1"}
    )
    assert '"X-Keep": "1"' in result.content
    assert "s3cret" not in result.content
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"
