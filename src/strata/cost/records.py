"""What metering writes (`UsageEvent`, one per request or run step) and what reports read (`UsageRow`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

UsageKind = Literal["chat", "embeddings", "completions", "run_step"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEvent:
    """One model call: a client's chat completion (`chat`), embeddings or text completion, or one model step of an
    agent run (`run_step`).

    `ts` is when it ended (its cost is known then); `latency_s` its whole duration, `ttft_s` the time to the
    first streamed chunk (None when not streamed); `status` an HTTP-like code (200, or the error's status).
    `cached_tokens` are a part of `prompt_tokens`."""

    ts: datetime
    request_id: str | None
    kind: UsageKind
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float
    cached_tokens: int = 0
    key_id: str | None = None
    user: str | None = None
    agent: str | None = None
    run_id: str | None = None
    ttft_s: float | None = None
    status: int = 200

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ts"] = _iso(self.ts)
        return out


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of a usage report. `group` is None for rows without the grouped field (a chat has no agent)."""

    group: str | None
    requests: int
    errors: int  # status >= 400
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    latency_p50_s: float | None
    latency_p95_s: float | None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


def utc(when: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken as UTC (SQLite hands back naive UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _iso(when: datetime) -> str:
    return utc(when).isoformat().replace("+00:00", "Z")
