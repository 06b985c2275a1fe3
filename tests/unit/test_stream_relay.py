"""The SSE relay against byte streams the way real servers cut them (CRLF, split events, pings)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson

from strata.serving.errors import ServerShuttingDownError, UpstreamTimeoutError, UpstreamUnavailableError
from strata.serving.stream_relay import ChatStreamRelay
from strata.serving.usage import ApproximateTokenCounter


class ByteStream:
    """Feeds the relay exactly these network reads."""

    def __init__(self, *reads: bytes, fail: Exception | None = None) -> None:
        self.reads = reads
        self.fail = fail
        self.closed = False
        self.deployment = "test/0"

    async def chunks(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read
        if self.fail:
            raise self.fail

    def close(self) -> None:
        self.closed = True


def chunk(content: str, **extra: object) -> bytes:
    event = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    event["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    event.update(extra)
    return orjson.dumps(event)


class StalledStream(ByteStream):
    """Sends its reads, then waits for more until closed; its pending read then fails, as aiohttp's does."""

    def __init__(self, *reads: bytes) -> None:
        super().__init__(*reads)
        self._closed = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read
        await self._closed.wait()
        raise UpstreamUnavailableError("the backend's stream broke off: Connection closed", deployment="test/0")

    def close(self) -> None:
        super().close()
        self._closed.set()


def make_relay(stream: ByteStream, *, wants_usage: bool = False, reports_usage: bool = True) -> ChatStreamRelay:
    async def prompt_tokens() -> int:
        return 10

    return ChatStreamRelay(
        stream,  # type: ignore[arg-type]
        client_wants_usage=wants_usage,
        backend_reports_usage=reports_usage,
        prompt_tokens=prompt_tokens,
        counter=ApproximateTokenCounter(),
    )


async def relay_all(stream: ByteStream, *, wants_usage: bool = False, reports_usage: bool = True) -> list[bytes]:
    return [event async for event in make_relay(stream, wants_usage=wants_usage, reports_usage=reports_usage)]


async def test_crlf_events_split_across_reads_come_out_as_openai_sse() -> None:
    first, second = chunk("Hel"), chunk("lo")
    wire = b"data: " + first + b"\r\n\r\n: ping - 2024\r\n\r\ndata: " + second + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    stream = ByteStream(*(wire[i : i + 7] for i in range(0, len(wire), 7)))
    out = await relay_all(stream)
    assert out == [b"data: " + first + b"\n\n", b"data: " + second + b"\n\n", b"data: [DONE]\n\n"]
    assert stream.closed


async def test_usage_event_is_hidden_unless_the_client_asked() -> None:
    usage = orjson.dumps(
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    )
    wire = b"data: " + chunk("x") + b"\n\ndata: " + usage + b"\n\ndata: [DONE]\n\n"
    assert await relay_all(ByteStream(wire)) == [b"data: " + chunk("x") + b"\n\n", b"data: [DONE]\n\n"]
    shown = await relay_all(ByteStream(wire), wants_usage=True)
    assert shown[1] == b"data: " + usage + b"\n\n"


async def test_usage_is_counted_when_the_backend_sends_none() -> None:
    wire = b"data: " + chunk("abcdefgh") + b"\n\ndata: " + chunk("ijkl") + b"\n\ndata: [DONE]\n\n"
    out = await relay_all(ByteStream(wire), wants_usage=True, reports_usage=False)
    usage_event = orjson.loads(out[-2][6:])
    assert usage_event["choices"] == [] and usage_event["id"] == "c1"
    assert usage_event["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert out[-1] == b"data: [DONE]\n\n"


async def test_multi_line_data_events_stay_multi_line() -> None:
    wire = b'data: {"a":\ndata: 1}\n\ndata: [DONE]\n\n'
    assert (await relay_all(ByteStream(wire)))[0] == b'data: {"a":\ndata: 1}\n\n'


async def test_a_timeout_midway_becomes_an_error_event_and_closes_upstream() -> None:
    stream = ByteStream(b"data: " + chunk("a") + b"\n\n", fail=UpstreamTimeoutError("no data for 5s", deployment="d"))
    out = await relay_all(stream)
    error = orjson.loads(out[-1][6:])["error"]
    assert (error["code"], error["message"], error["deployment"]) == ("upstream_timeout", "no data for 5s", "d")
    assert b"[DONE]" not in b"".join(out)
    assert stream.closed


async def test_the_relay_keeps_why_a_stream_failed_and_nothing_for_one_that_completed() -> None:
    cut = make_relay(ByteStream(b"data: " + chunk("a") + b"\n\n"))  # closed without [DONE]
    assert b"upstream_unavailable" in [event async for event in cut][-1]
    assert cut.stats.error is not None and cut.stats.error.code == "upstream_unavailable"
    assert cut.stats.chunks == 1
    complete = make_relay(ByteStream(b"data: " + chunk("a") + b"\n\ndata: [DONE]\n\n"))
    assert [event async for event in complete][-1] == b"data: [DONE]\n\n"
    assert complete.stats.error is None


async def test_interrupt_ends_a_waiting_stream_with_its_own_error_event() -> None:
    stream = StalledStream(b"data: " + chunk("a") + b"\n\n")
    relay = make_relay(stream)
    events = relay.__aiter__()
    assert await anext(events) == b"data: " + chunk("a") + b"\n\n"
    waiting = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    relay.interrupt(ServerShuttingDownError("Strata is shutting down"))
    error = orjson.loads((await asyncio.wait_for(waiting, 5))[6:])["error"]
    assert (error["code"], error["type"], error["message"]) == (
        "server_shutting_down",
        "server_error",
        "Strata is shutting down",
    )
    assert [rest async for rest in events] == []
    assert stream.closed and relay.stats.error is not None and relay.stats.error.code == "server_shutting_down"


async def test_each_choice_s_finish_reason_is_kept_as_compact_or_spaced_json_writes_it() -> None:
    def ended(index: int, reason: str | None) -> dict[str, object]:
        return {"index": index, "delta": {}, "finish_reason": reason}

    spaced = b'{"id": "c1", "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]}'
    wire = b"".join(
        b"data: " + event + b"\n\n"
        for event in (
            chunk("a"),
            chunk("", choices=[ended(0, "tool_calls"), ended(1, None)]),
            spaced,
            b"[DONE]",
        )
    )
    relay = make_relay(ByteStream(wire))
    assert [event async for event in relay][-1] == b"data: [DONE]\n\n"
    assert relay.stats.finish_reasons == {0: "tool_calls", 1: "length"}


async def test_an_in_process_reader_gets_parsed_chunks_and_a_cut_stream_raises() -> None:
    whole = make_relay(ByteStream(b"data: " + chunk("He") + b"\r\n\r\ndata: " + chunk("llo") + b"\n\ndata: [DONE]\n\n"))
    contents = [event["choices"][0]["delta"]["content"] async for event in whole.events()]
    assert contents == ["He", "llo"]
    stream = ByteStream(b"data: " + chunk("He") + b"\n\n")
    cut = make_relay(stream)
    seen = []
    try:
        async for event in cut.events():
            seen.append(event)
        raise AssertionError("a stream cut short must raise")
    except UpstreamUnavailableError as exc:
        assert "before it was complete" in exc.message
    assert len(seen) == 1 and stream.closed
