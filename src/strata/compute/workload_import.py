"""Calls for a workload profile from a request log in OpenAI's JSONL shapes, for traffic Strata did not serve.

Each line is one of:
- a chat completions request body (`{"model": ..., "messages": [...], "max_tokens": ...}`);
- a line of OpenAI's Batch API input (`{"custom_id": ..., "url": "/v1/chat/completions", "body": {...}}`);
- a logged exchange (`{"request": {...}, "response": {... "usage": {...}}, "timestamp": ..., "latency_s": ...}`),
  which is what gateways' request logs hold.
Prompt tokens come from the response's `usage` when there is one, otherwise from the messages with Strata's
own estimate (`compute.tokens.count_tokens`); completion tokens from `usage`, otherwise from the request's
`max_completion_tokens`/`max_tokens` (an upper bound, said so in the report). A line's time, when it has one
(`timestamp`: ISO 8601 or Unix seconds, or the response's `created`), is when the call started.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from strata.compute.tokens import count_tokens
from strata.compute.workload import Call


class WorkloadFileError(ValueError):
    """A line that is not a chat request in a shape this reader knows; the message names the line."""


@dataclass
class Imported:
    calls: list[Call]
    completion_from_limits: int  # calls whose completion tokens are the request's limit, not a measurement
    without_time: int


def read_jsonl(lines: Iterable[str | bytes], *, default_model: str = "unknown") -> Imported:
    calls: list[Call] = []
    from_limits = untimed = 0
    for call, estimated in _calls(lines, default_model):
        calls.append(call)
        from_limits += estimated
        untimed += call.end is None
    return Imported(calls, from_limits, untimed)


def _calls(lines: Iterable[str | bytes], default_model: str) -> Iterator[tuple[Call, bool]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise WorkloadFileError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise WorkloadFileError(f"line {number}: expected a JSON object, got {type(entry).__name__}")
        try:
            call, estimated = _call(entry, default_model)
        except (TypeError, ValueError) as exc:
            raise WorkloadFileError(f"line {number}: {exc}") from None
        yield call, estimated


def _call(entry: dict[str, Any], default_model: str) -> tuple[Call, bool]:
    request = entry.get("request") or entry.get("body") or entry
    response = entry.get("response") or {}
    if isinstance(response, dict) and isinstance(response.get("body"), dict):
        response = response["body"]  # Batch API output lines wrap the body
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise ValueError("no chat request here: expected 'messages' (a list) in the line, its 'body' or 'request'")
    usage = response.get("usage") if isinstance(response, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = count_tokens(_text(request["messages"]))
    completion = usage.get("completion_tokens")
    estimated = completion is None
    if completion is None:
        completion = request.get("max_completion_tokens") or request.get("max_tokens") or 0
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        raise ValueError("token counts must be non-negative integers")
    latency = entry.get("latency_s")
    if latency is not None and (not isinstance(latency, int | float) or latency < 0):
        raise ValueError("'latency_s' must be a non-negative number of seconds")
    started = _time(entry.get("timestamp"), response.get("created") if isinstance(response, dict) else None)
    end = started + timedelta(seconds=latency or 0.0) if started is not None else None
    status = entry.get("status_code") or (response.get("status_code") if isinstance(response, dict) else None)
    call = Call(
        model=str(request.get("model") or default_model),
        prompt_tokens=prompt,
        completion_tokens=completion,
        end=end,
        latency_s=float(latency) if latency is not None else None,
        ttft_s=entry.get("ttft_s"),
        status=int(status) if isinstance(status, int) else 200,
        cost_usd=float(entry.get("cost_usd") or 0.0),
        user=request.get("user") if isinstance(request.get("user"), str) else None,
    )
    return call, estimated


def _text(messages: list[Any]) -> str:
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("each message must be an object")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if message.get("tool_calls"):
            parts.append(orjson.dumps(message["tool_calls"]).decode())
    return "\n".join(parts)


def _time(timestamp: object, created: object) -> datetime | None:
    value = timestamp if timestamp is not None else created
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("'timestamp' must be ISO 8601 or Unix seconds")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"'timestamp' {value!r} is not ISO 8601") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError("'timestamp' must be ISO 8601 or Unix seconds")
