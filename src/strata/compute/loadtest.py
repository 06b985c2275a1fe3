"""A load test of any OpenAI-compatible chat endpoint, in steps of rising load, against SLOs.

Each step runs in a process of its own (`loadtest_worker`), so the generator's event loop is never the one
under test and a step's numbers are not bent by the last one's leftovers. A step is either:
- `rate`: open loop, Poisson arrivals at that many requests per second. Latency counts from each request's
  *scheduled* time, so a generator or server that falls behind shows it as latency (no coordinated omission);
- `concurrency`: closed loop, that many clients each sending its next request when the last one ends.
Every request streams (`stream_options.include_usage`), so time to first token and the gaps between chunks
are measured; a step is bounded by its duration and by a request count, and waits at most `timeout_s` for
the stragglers. Prompts and answer lengths are drawn from a workload profile's histograms (`strata profile
--json`) or fixed sizes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from strata.compute.workload import Distribution, Latency, Slo, SloResult, slo_results

StepKind = Literal["rate", "concurrency"]
# Common English words that real tokenizers keep whole: a prompt of N of them is about N tokens.
_WORDS = tuple(
    [
        "the",
        "data",
        "model",
        "time",
        "system",
        "user",
        "value",
        "service",
        "request",
        "answer",
        "people",
        "world",
        "report",
        "number",
    ]
)


@dataclass(frozen=True, slots=True)
class TokenSampler:
    """Token counts drawn from a histogram: a bin by its weight, then uniformly within it."""

    bins: tuple[tuple[float, float, int], ...]

    @staticmethod
    def fixed(tokens: int) -> TokenSampler:
        return TokenSampler(((tokens, tokens, 1),))

    @staticmethod
    def from_profile(distribution: dict[str, Any]) -> TokenSampler:
        bins = tuple((float(low), float(high), int(n)) for low, high, n in distribution["histogram"])
        if not bins or sum(n for *_, n in bins) <= 0:
            raise ValueError("the profile's histogram is empty")
        return TokenSampler(bins)

    def draw(self, rng: random.Random) -> int:
        low, high, _ = rng.choices(self.bins, weights=[n for *_, n in self.bins])[0]
        return max(1, round(rng.uniform(low, high)))


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step, as its worker process receives it (JSON on stdin)."""

    target: Target
    kind: StepKind
    load: float  # requests per second, or concurrent clients
    duration_s: float
    max_requests: int
    timeout_s: float
    prompts: list[int]  # tokens per request, drawn up front so a step is reproducible from its seed
    max_tokens: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def of(data: dict[str, Any]) -> StepSpec:
        return StepSpec(**{**data, "target": Target(**data["target"])})


def plan_step(
    target: Target,
    kind: StepKind,
    load: float,
    *,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
    prompt: TokenSampler,
    completion: TokenSampler,
    seed: int = 7,
) -> StepSpec:
    rng = random.Random(f"{seed}:{kind}:{load}")
    wanted = max_requests if kind == "concurrency" else min(max_requests, max(1, round(load * duration_s * 1.5)))
    return StepSpec(
        target=target,
        kind=kind,
        load=load,
        duration_s=duration_s,
        max_requests=max_requests,
        timeout_s=timeout_s,
        prompts=[prompt.draw(rng) for _ in range(wanted)],
        max_tokens=[completion.draw(rng) for _ in range(wanted)],
    )


def prompt_text(tokens: int, index: int) -> str:
    """About `tokens` tokens of text, different per request (no prompt cache makes a step look faster)."""
    words = [f"request {index}:"]
    words.extend(_WORDS[(index + i) % len(_WORDS)] for i in range(max(tokens - 3, 0)))
    return " ".join(words)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request as the worker saw it; times in seconds from the request's start (scheduled, open loop)."""

    ok: bool
    status: int
    ttft_s: float | None
    e2e_s: float
    gaps_s: list[float]  # between consecutive content chunks
    completion_tokens: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    kind: StepKind
    load: float
    sent: int
    completed: int
    errors: int
    error_examples: list[str]
    wall_s: float
    achieved_rps: float
    output_tokens_per_s: float
    latency: Latency
    slos: list[SloResult] = field(default_factory=list)
    meets_slos: bool | None = None
    send_lag_p99_ms: float | None = None  # open loop: how late the generator sent (its own health)
    generator_cpu_s: float | None = None


def summarise(
    kind: StepKind,
    load: float,
    outcomes: list[Outcome],
    wall_s: float,
    slo: Slo,
    *,
    max_error_rate: float,
    lags_s: list[float] | None = None,
    cpu_s: float | None = None,
) -> StepResult:
    good = [o for o in outcomes if o.ok]
    latency = Latency(
        ttft_s=Distribution.of([o.ttft_s for o in good if o.ttft_s is not None], (50, 95, 99)),
        itl_s=Distribution.of([gap for o in good for gap in o.gaps_s], (50, 95, 99)),
        e2e_s=Distribution.of([o.e2e_s for o in good], (50, 95, 99)),
    )
    errors = len(outcomes) - len(good)
    checks = slo_results(latency, slo)
    error_rate = errors / len(outcomes) if outcomes else 1.0
    meets = bool(good) and error_rate <= max_error_rate and all(c.met for c in checks)
    lag = Distribution.of(lags_s, (99,)) if lags_s else None
    examples = sorted({o.error for o in outcomes if o.error})[:3]
    return StepResult(
        kind=kind,
        load=load,
        sent=len(outcomes),
        completed=len(good),
        errors=errors,
        error_examples=[e for e in examples if e],
        wall_s=wall_s,
        achieved_rps=len(good) / wall_s if wall_s > 0 else 0.0,
        output_tokens_per_s=sum(o.completion_tokens for o in good) / wall_s if wall_s > 0 else 0.0,
        latency=latency,
        slos=checks,
        meets_slos=meets,
        send_lag_p99_ms=lag.p(99) * 1000 if lag else None,
        generator_cpu_s=cpu_s,
    )


@dataclass(frozen=True, slots=True)
class LoadTestReport:
    target: str
    model: str
    kind: StepKind
    steps: list[StepResult]
    best: float | None  # the highest load whose step met every SLO (None: none did)
    slo: Slo

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def report(target: Target, kind: StepKind, steps: list[StepResult], slo: Slo) -> LoadTestReport:
    passing = [s.load for s in steps if s.meets_slos]
    return LoadTestReport(target.url, target.model, kind, steps, max(passing) if passing else None, slo)
