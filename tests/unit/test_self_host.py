"""Self-hosting sizing and cost on a profile whose numbers are known by hand."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from strata.compute.catalog import find_model
from strata.compute.planner import PlanError
from strata.compute.self_host import DECODE_EFFICIENCY, GPU_SPECS, HOURS_PER_MONTH, Measured, estimate
from strata.compute.workload import Call, profile

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def load(calls_per_minute: int, minutes: int, prompt: int = 1000, completion: int = 200) -> list[Call]:
    """`calls_per_minute` calls each minute, two at a time (each lasts 2 s, pairs start together)."""
    calls = []
    for minute in range(minutes):
        for i in range(calls_per_minute):
            start = T0 + timedelta(minutes=minute, seconds=(i // 2) * 3)
            calls.append(Call(model="api", prompt_tokens=prompt, completion_tokens=completion,
                              end=start + timedelta(seconds=2), latency_s=2.0, cost_usd=0.002))  # fmt: skip
    return calls


def test_sizing_and_break_even_from_a_measured_replica() -> None:
    result = profile(load(calls_per_minute=12, minutes=60))  # 720 calls in an hour
    shape = find_model("llama-3.1-8b")
    sized = estimate(result, shape, gpu="H100", gpu_usd_per_hour=2.0, price_source="test", window_days=1.0,
                     measured=Measured(output_tokens_per_s=30.0, load=2, source="lt.json"))  # fmt: skip
    assert sized.plan.fits and sized.plan.request.concurrency == 2
    assert sized.plan.request.max_context == 1200  # p99 prompt + p99 completion
    peak_tokens_per_s = 12 / 60 * 200  # 40 tokens/s at the peak minute
    assert sized.replicas == math.ceil(peak_tokens_per_s / 30.0) == 2
    assert sized.self_host_usd_per_month == pytest.approx(2 * 1 * 2.0 * HOURS_PER_MONTH)
    assert sized.api_usd_per_month == pytest.approx(720 * 0.002 * 30)
    capacity = 2 * 30.0 * HOURS_PER_MONTH * 3600
    assert sized.capacity_tokens_per_month == pytest.approx(capacity)
    assert sized.utilisation == pytest.approx(720 * 200 * 30 / capacity)
    per_token = 720 * 0.002 / (720 * 200)
    assert sized.break_even_utilisation == pytest.approx(sized.self_host_usd_per_month / (capacity * per_token))
    assert sized.cheaper == "api"  # 2.5% used against a break-even of 47%
    sources = {a.name: a.source for a in sized.assumptions}
    assert "measured by strata loadtest (lt.json)" in sources["output tokens/s per replica"]
    assert "decode efficiency" not in sources


def test_the_estimate_without_a_loadtest_says_it_is_one() -> None:
    result = profile(load(calls_per_minute=2, minutes=10))
    shape = find_model("llama-3.1-8b")
    sized = estimate(result, shape, gpu="L4", gpu_usd_per_hour=0.6, price_source="test", window_days=1.0,
                     api_usd_per_mtok=(10.0, 30.0))  # fmt: skip
    step_s = sized.plan.weight_bytes / (GPU_SPECS["L4"].bandwidth_gb_s * 1e9 * DECODE_EFFICIENCY)
    per_replica = {a.name: a for a in sized.assumptions}["output tokens/s per replica"]
    assert per_replica.value == pytest.approx(2 / step_s)
    assert per_replica.source.startswith("estimated")
    assert sized.api_usd_per_month == pytest.approx((20 * 1000 * 10 + 20 * 200 * 30) * 1e-6 * 30)


def test_a_model_too_big_for_eight_gpus_and_an_empty_profile_are_refused() -> None:
    with pytest.raises(PlanError, match="does not fit on 2 x L4"):
        estimate(profile(load(2, 1)), find_model("llama-3.3-70b"), gpu="L4", gpu_usd_per_hour=1, price_source="t",
                 window_days=1, max_gpus=2)  # fmt: skip
    with pytest.raises(PlanError, match="no calls"):
        estimate(profile([]), find_model("llama-3.1-8b"), gpu="L4", gpu_usd_per_hour=1, price_source="t",
                 window_days=1)  # fmt: skip
