"""A workload profile: what the traffic asks of a model server, measured from recorded calls.

The first step of sizing a deployment is to know the load: how long prompts and answers are, how many
calls run at once at the peak, how bursty arrivals are, what latency was achieved against the SLOs and
what it cost. Every number here comes from `Call`s — Strata's usage records or an imported request log —
so the same function serves `strata profile`, its JSON and HTML reports and the sizing that follows.

Percentiles use the nearest-rank method, like the usage report (`store/usage.py`): the p-th percentile of
n values is the value at rank ceil(p/100 x n), always one of the observed values.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

PERCENTILES = (50, 90, 99)
LATENCY_PERCENTILES = (50, 95, 99)
HISTOGRAM_BINS = 12


@dataclass(frozen=True, slots=True)
class Call:
    """One model call as the profile sees it. `end` and `latency_s` place it in time (start = end -
    latency); calls without times (an imported log without timestamps) still count for tokens."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    end: datetime | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    status: int = 200
    cost_usd: float = 0.0
    kind: str = "chat"
    agent: str | None = None
    key_id: str | None = None
    user: str | None = None
    run_id: str | None = None

    @property
    def start(self) -> datetime | None:
        if self.end is None:
            return None
        return self.end - timedelta(seconds=self.latency_s or 0.0)

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency of a streamed answer: the time after the first token over the rest."""
        if self.ttft_s is None or self.latency_s is None or self.completion_tokens < 2:
            return None
        return max(self.latency_s - self.ttft_s, 0.0) / (self.completion_tokens - 1)


@dataclass(frozen=True, slots=True)
class Slo:
    """Targets to check the achieved latency against; None: not checked."""

    ttft_p95_ms: float | None = None
    ttft_ms: float | None = None  # p50
    e2e_p95_s: float | None = None
    e2e_p99_s: float | None = None
    itl_p95_ms: float | None = None

    def checks(self) -> list[tuple[str, str, int, float, float]]:
        """(label, metric, percentile, target, scale to seconds) for each target set."""
        wanted = [
            ("TTFT p50", "ttft_s", 50, self.ttft_ms, 1e-3),
            ("TTFT p95", "ttft_s", 95, self.ttft_p95_ms, 1e-3),
            ("inter-token p95", "itl_s", 95, self.itl_p95_ms, 1e-3),
            ("end-to-end p95", "e2e_s", 95, self.e2e_p95_s, 1.0),
            ("end-to-end p99", "e2e_s", 99, self.e2e_p99_s, 1.0),
        ]
        return [(label, metric, p, target, scale) for label, metric, p, target, scale in wanted if target is not None]


@dataclass(frozen=True, slots=True)
class Distribution:
    count: int
    mean: float
    percentiles: dict[str, float]  # "p50" -> value
    max: float
    histogram: list[tuple[float, float, int]]  # (low, high, count), equal-width bins

    @staticmethod
    def of(values: Sequence[float], percentiles: Sequence[int] = PERCENTILES) -> Distribution | None:
        if not values:
            return None
        ordered = sorted(values)
        return Distribution(
            count=len(ordered),
            mean=statistics.fmean(ordered),
            percentiles={f"p{p}": nearest_rank(ordered, p) for p in percentiles},
            max=ordered[-1],
            histogram=_histogram(ordered),
        )

    def p(self, percentile: int) -> float:
        return self.percentiles[f"p{percentile}"]


def nearest_rank(ordered: Sequence[float], percentile: float) -> float:
    """The p-th percentile of sorted values: the value at rank ceil(p/100 x n) (1-based)."""
    rank = max(1, math.ceil(percentile / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _histogram(ordered: Sequence[float], bins: int = HISTOGRAM_BINS) -> list[tuple[float, float, int]]:
    low, high = ordered[0], ordered[-1]
    if high == low:
        return [(low, high, len(ordered))]
    width = (high - low) / bins
    counts = Counter(min(int((value - low) / width), bins - 1) for value in ordered)
    return [(low + i * width, low + (i + 1) * width, counts.get(i, 0)) for i in range(bins)]


@dataclass(frozen=True, slots=True)
class TokenProfile:
    calls: int
    prompt: Distribution | None
    completion: Distribution | None


@dataclass(frozen=True, slots=True)
class Traffic:
    """Arrivals and overlap. Concurrency is the number of calls between their start and end, swept over
    every start and end; its p95 is over time (the level exceeded 5% of the busy window's duration)."""

    first: datetime
    last: datetime
    per_minute: list[tuple[datetime, int]]  # every minute from the first start to the last, zeros included
    peak_rpm: int
    mean_rpm: float
    burstiness: float  # coefficient of variation of the per-minute counts: 0 steady, > 1 bursty
    peak_concurrency: int
    p95_concurrency: int
    mean_concurrency: float
    by_hour: list[int]  # calls started in each UTC hour of the day, 0..23


@dataclass(frozen=True, slots=True)
class Latency:
    ttft_s: Distribution | None
    itl_s: Distribution | None
    e2e_s: Distribution | None


@dataclass(frozen=True, slots=True)
class SloResult:
    label: str
    target: float
    achieved: float | None
    unit: str
    met: bool | None  # None: nothing measured


@dataclass(frozen=True, slots=True)
class Runs:
    runs: int
    steps: Distribution | None  # model steps per run
    tools: Distribution | None  # tool calls per run (when known)
    duration_s: Distribution | None  # first step's start to last step's end
    cost_per_run_usd: float


@dataclass(frozen=True, slots=True)
class Spend:
    total_usd: float
    per_1k_requests_usd: float
    by_model: dict[str, float]
    by_agent: dict[str, float]
    by_user: dict[str, float]
    by_key: dict[str, float]


@dataclass(frozen=True, slots=True)
class WorkloadProfile:
    calls: int
    errors: int
    tokens: TokenProfile
    by_model: dict[str, TokenProfile]
    by_agent: dict[str, TokenProfile]
    traffic: Traffic | None
    latency: Latency
    slos: list[SloResult]
    runs: Runs | None
    spend: Spend
    source: str = "usage records"
    filters: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """Plain data for orjson, which writes the datetimes as ISO 8601 and a NaN as null."""
        return asdict(self)


def profile(
    calls: Iterable[Call],
    *,
    slo: Slo | None = None,
    tools_per_run: dict[str, int] | None = None,
    source: str = "usage records",
    filters: dict[str, str] | None = None,
) -> WorkloadProfile:
    """The profile of `calls`. `tools_per_run` (run id -> tool calls) adds tool counts to the run section."""
    every = list(calls)
    return WorkloadProfile(
        calls=len(every),
        errors=sum(1 for c in every if c.status >= 400),
        tokens=_tokens(every),
        by_model={name: _tokens(group) for name, group in _grouped(every, lambda c: c.model).items()},
        by_agent={name: _tokens(group) for name, group in _grouped(every, lambda c: c.agent).items()},
        traffic=_traffic(every),
        latency=_latency(every),
        slos=_slos(every, slo or Slo()),
        runs=_runs(every, tools_per_run),
        spend=_spend(every),
        source=source,
        filters=filters or {},
    )


def _grouped(calls: Sequence[Call], key: Callable[[Call], str | None]) -> dict[str, list[Call]]:
    groups: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        name = key(call)
        if name is not None:
            groups[name].append(call)
    return dict(sorted(groups.items()))


def _tokens(calls: Sequence[Call]) -> TokenProfile:
    return TokenProfile(
        calls=len(calls),
        prompt=Distribution.of([c.prompt_tokens for c in calls]),
        completion=Distribution.of([c.completion_tokens for c in calls]),
    )


def _traffic(calls: Sequence[Call]) -> Traffic | None:
    timed = [(c.start, c.end) for c in calls if c.end is not None]
    if not timed:
        return None
    starts = sorted(start for start, _ in timed if start is not None)
    first, last = starts[0], max(end for _, end in timed if end is not None)
    minute0 = first.replace(second=0, microsecond=0)
    minutes = int((starts[-1] - minute0).total_seconds() // 60) + 1
    counts = Counter(int((start - minute0).total_seconds() // 60) for start in starts)
    per_minute = [(minute0 + timedelta(minutes=i), counts.get(i, 0)) for i in range(minutes)]
    series = [n for _, n in per_minute]
    mean = statistics.fmean(series)
    peak, p95, average = _concurrency(timed, first, last)
    by_hour = [0] * 24
    for start in starts:
        by_hour[start.astimezone(UTC).hour] += 1
    return Traffic(
        first=first,
        last=last,
        per_minute=per_minute,
        peak_rpm=max(series),
        mean_rpm=mean,
        burstiness=statistics.pstdev(series) / mean if mean else 0.0,
        peak_concurrency=peak,
        p95_concurrency=p95,
        mean_concurrency=average,
        by_hour=by_hour,
    )


Span = tuple[datetime | None, datetime | None]


def _concurrency(spans: Sequence[Span], first: datetime, last: datetime) -> tuple[int, int, float]:
    """Peak, time-weighted p95 and mean of the number of calls in progress over [first, last]."""
    edges: list[tuple[datetime, int]] = []
    for start, end in spans:
        assert start is not None and end is not None
        edges.append((start, 1))
        edges.append((end, -1))
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    level = peak = 0
    time_at: Counter[int] = Counter()
    previous = first
    for moment, step in edges:
        time_at[level] += (moment - previous).total_seconds()
        previous = moment
        level += step
        peak = max(peak, level)
    window = (last - first).total_seconds()
    if window <= 0:
        return peak, peak, float(peak)
    mean = sum(level * seconds for level, seconds in time_at.items()) / window
    exceeded = 0.0
    p95 = 0
    for level in sorted(time_at, reverse=True):  # the highest level held for at least 5% of the window
        exceeded += time_at[level]
        if exceeded >= 0.05 * window:
            p95 = level
            break
    return peak, p95, mean


def _latency(calls: Sequence[Call]) -> Latency:
    ok = [c for c in calls if c.status < 400]
    return Latency(
        ttft_s=Distribution.of([c.ttft_s for c in ok if c.ttft_s is not None], LATENCY_PERCENTILES),
        itl_s=Distribution.of([c.itl_s for c in ok if c.itl_s is not None], LATENCY_PERCENTILES),
        e2e_s=Distribution.of([c.latency_s for c in ok if c.latency_s is not None], LATENCY_PERCENTILES),
    )


def _slos(calls: Sequence[Call], slo: Slo) -> list[SloResult]:
    return slo_results(_latency(calls), slo)


def slo_results(latency: Latency, slo: Slo) -> list[SloResult]:
    """Each target of `slo` against what `latency` achieved (None: nothing measured to judge by)."""
    results = []
    for label, metric, percentile, target, scale in slo.checks():
        distribution: Distribution | None = getattr(latency, metric)
        achieved = distribution.p(percentile) / scale if distribution else None
        unit = "ms" if scale < 1 else "s"
        met = None if achieved is None else achieved <= target
        results.append(SloResult(label, target, achieved, unit, met))
    return results


def _runs(calls: Sequence[Call], tools_per_run: dict[str, int] | None) -> Runs | None:
    by_run = _grouped([c for c in calls if c.run_id], lambda c: c.run_id)
    if not by_run:
        return None
    durations = []
    for steps in by_run.values():
        starts = [c.start for c in steps if c.start is not None]
        ends = [c.end for c in steps if c.end is not None]
        if starts and ends:
            durations.append((max(ends) - min(starts)).total_seconds())
    tools = [tools_per_run.get(run, 0) for run in by_run] if tools_per_run is not None else []
    return Runs(
        runs=len(by_run),
        steps=Distribution.of([len(steps) for steps in by_run.values()]),
        tools=Distribution.of(tools),
        duration_s=Distribution.of(durations),
        cost_per_run_usd=sum(c.cost_usd for steps in by_run.values() for c in steps) / len(by_run),
    )


def _spend(calls: Sequence[Call]) -> Spend:
    def by(key: Callable[[Call], str | None]) -> dict[str, float]:
        groups = _grouped(calls, key)
        totals = {name: sum(c.cost_usd for c in group) for name, group in groups.items()}
        return dict(sorted(totals.items(), key=lambda item: (-item[1], item[0])))

    total = sum(c.cost_usd for c in calls)
    return Spend(
        total_usd=total,
        per_1k_requests_usd=total / len(calls) * 1000 if calls else 0.0,
        by_model=by(lambda c: c.model),
        by_agent=by(lambda c: c.agent),
        by_user=by(lambda c: c.user),
        by_key=by(lambda c: c.key_id),
    )
