"""Overload on a real server: beyond `server.max_in_flight` requests in progress, a request is refused at once with
503, `Retry-After` and OpenAI's error shape, while probes still answer and the requests in progress finish; a
stream stops counting once its response has started, and a synchronous agent run stops counting while it waits for
the run, so neither locks short requests out."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
SLOW_S = 1.5


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [mock_model(mock_backend)],
        "agents": [{"name": "helper", "model": "mock-model", "tools": []}],
        "server": {"max_in_flight": 2, "drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(tmp_path_factory.mktemp("shedding"), config, env={"MOCK_API_KEY": "mock-secret"})
    yield process.start()
    assert process.stop() == 0


def _shed_count(strata: StrataProcess) -> float:
    with strata.client() as client:
        text = client.get("/metrics").text
    match = re.search(r"^strata_shed_requests_total (\S+)$", text, re.MULTILINE)
    assert match, "strata_shed_requests_total is missing from /metrics"
    return float(match.group(1))


async def _while_two_are_slow(strata: StrataProcess) -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(base_url=strata.url, headers=strata.headers, timeout=30) as client:
        slow = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT)) for _ in range(2)]
        await asyncio.sleep(SLOW_S / 3)  # both are in progress, waiting on the backend
        started = time.monotonic()
        refused = await client.post("/v1/chat/completions", json=CHAT)
        refused_after_s = time.monotonic() - started
        health = await client.get("/healthz")
        assert refused_after_s < SLOW_S / 3, "the refusal waited for the requests in progress"
        return list(await asyncio.gather(*slow)), refused, health


def test_requests_beyond_the_bound_are_refused_at_once_and_the_rest_finish(
    strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(content="slow one", latency_s=SLOW_S), Reply(content="slow two", latency_s=SLOW_S))
    shed_before = _shed_count(strata)

    finished, refused, health = asyncio.run(_while_two_are_slow(strata))

    assert [r.status_code for r in finished] == [200, 200]
    assert sorted(r.json()["choices"][0]["message"]["content"] for r in finished) == ["slow one", "slow two"]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error"
    assert error["request_id"] and refused.headers["x-request-id"] == error["request_id"]
    assert "server.max_in_flight" in error["message"]
    assert health.status_code == 200, "a shedding server must still answer its probes"
    assert _shed_count(strata) == shed_before + 1
    with strata.client() as client:  # the bound frees up as requests finish
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_stream_stops_counting_once_it_has_started(strata: StrataProcess, mock_backend: MockBackend) -> None:
    streams = [Reply(content="one two three four five six", chunks=6, chunk_delay_s=0.4) for _ in range(2)]
    mock_backend.script(*streams)
    body = {**CHAT, "stream": True}
    path = "/v1/chat/completions"
    with (
        strata.client(timeout=30) as client,
        client.stream("POST", path, json=body) as first,
        client.stream("POST", path, json=body) as second,
    ):
        assert first.status_code == second.status_code == 200
        # Two streams flowing with a bound of two: a short request still gets in.
        answer = httpx.post(f"{strata.url}{path}", json=CHAT, headers=strata.headers, timeout=30)
        assert answer.status_code == 200
        chunks = [line for line in second.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"


async def _chat_while_two_runs_wait(strata: StrataProcess) -> tuple[list[httpx.Response], httpx.Response]:
    async with httpx.AsyncClient(base_url=strata.url, headers=strata.headers, timeout=30) as client:
        body = {"input": "take your time", "mode": "sync"}
        runs = [asyncio.create_task(client.post("/v1/agents/helper/runs", json=body)) for _ in range(2)]
        await asyncio.sleep(SLOW_S / 3)  # both runs are waiting for their slow model step
        chat = await client.post("/v1/chat/completions", json=CHAT)
        return list(await asyncio.gather(*runs)), chat


def test_a_synchronous_run_stops_counting_while_it_waits(strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.script(Reply(content="run one", latency_s=SLOW_S), Reply(content="run two", latency_s=SLOW_S))

    runs, chat = asyncio.run(_chat_while_two_runs_wait(strata))

    assert chat.status_code == 200, "two waiting runs took every place"
    assert [r.status_code for r in runs] == [200, 200]
    assert {r.json()["status"] for r in runs} == {"completed"}


def _raw_request(path: str, body: bytes = b"", *, close: bool = False, key: str = "", method: str = "POST") -> bytes:
    """One whole HTTP/1.1 request, to be sent in one write: the kind the connection's protocol refuses itself."""
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: strata\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{'connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    return int(head[0].split()[1]), headers, await reader.readexactly(int(headers["content-length"]))


async def _raw_while_two_are_slow(strata: StrataProcess) -> list[tuple[int, dict[str, str], bytes]]:
    body = json.dumps(CHAT).encode()
    async with httpx.AsyncClient(base_url=strata.url, headers=strata.headers, timeout=30) as client:
        slow = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT)) for _ in range(2)]
        await asyncio.sleep(SLOW_S / 3)
        reader, writer = await asyncio.open_connection("127.0.0.1", strata.port)
        answers = []
        for request in (
            _raw_request("/v1/chat/completions", body, key=strata.api_key),  # refused
            _raw_request("/healthz", method="GET"),  # a probe on the same connection is still served
            _raw_request("/v1/chat/completions", body, key=strata.api_key, close=True),  # refused, then closed
        ):
            writer.write(request)
            answers.append(await _read_response(reader))
        closed = await reader.read()  # the server closed the connection after the last answer
        writer.close()
        await asyncio.gather(*slow)
    assert closed == b""
    return answers


def test_a_whole_request_is_refused_before_parsing_and_the_connection_goes_on(
    strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.script(Reply(content="slow one", latency_s=SLOW_S), Reply(content="slow two", latency_s=SLOW_S))
    shed_before = _shed_count(strata)

    refused, probe, last = asyncio.run(_raw_while_two_are_slow(strata))

    for status, headers, body in (refused, last):
        assert status == 503 and headers["retry-after"] == "1"
        error = json.loads(body)["error"]
        assert error["code"] == "overloaded" and error["request_id"] == headers["x-request-id"]
    assert last[1]["connection"] == "close"
    assert probe[0] == 200
    assert _shed_count(strata) == shed_before + 2
