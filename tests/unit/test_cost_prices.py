"""The price catalog (tokens, cached tokens, busy time), the embedded default, and GPU-time shares."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from strata.config import BudgetConfig, CostConfig, EmbeddedModelConfig, OpenAIModelConfig, StrataConfig
from strata.cost.gpu_time import BusyClock, GpuTimeShares
from strata.cost.prices import ModelPrice, PriceCatalog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def config(**extra: object) -> StrataConfig:
    models = [
        {"kind": "embedded"},
        {
            "kind": "openai",
            "name": "gpt",
            "base_url": "https://api.example.com/v1",
            "input_usd_per_mtok": 2.5,
            "output_usd_per_mtok": 10.0,
            "cached_input_usd_per_mtok": 1.25,
        },
        {"kind": "openai", "name": "plain", "base_url": "https://api.example.com/v1", "input_usd_per_mtok": 1.0},
        {"kind": "openai", "name": "own-gpu", "base_url": "http://gpu-1:8000/v1", "gpu_usd_per_hour": 7.2},
        {"kind": "openai", "name": "free", "base_url": "http://gpu-2:8000/v1"},
    ]
    return StrataConfig.model_validate({"models": models, **extra})


def test_token_prices_per_million() -> None:
    catalog = PriceCatalog.from_config(config())
    # 1M uncached prompt tokens at $2.5 + 0.5M completion tokens at $10
    assert catalog.cost("gpt", 1_000_000, 500_000) == pytest.approx(2.5 + 5.0)
    assert catalog.cost("gpt", 1000, 0) == pytest.approx(0.0025)


def test_cached_tokens_are_part_of_the_prompt() -> None:
    catalog = PriceCatalog.from_config(config())
    # 1,000 prompt tokens, 400 of them cached: 600 x $2.5 + 400 x $1.25 per million
    assert catalog.cost("gpt", 1000, 0, cached_tokens=400) == pytest.approx((600 * 2.5 + 400 * 1.25) / 1e6)
    # no cached price: cached tokens cost the input price
    assert catalog.cost("plain", 1000, 0, cached_tokens=400) == pytest.approx(1000 * 1.0 / 1e6)
    # more "cached" than prompt tokens is clamped, never negative
    assert catalog.cost("gpt", 100, 0, cached_tokens=1000) == pytest.approx(100 * 1.25 / 1e6)


def test_self_hosted_models_cost_their_share_of_busy_time() -> None:
    catalog = PriceCatalog.from_config(config())
    assert catalog.charges_busy_time("own-gpu")
    assert not catalog.charges_busy_time("gpt")
    # $7.20 an hour = $0.002 a second
    assert catalog.cost("own-gpu", 10_000, 10_000, busy_s=2.5) == pytest.approx(0.005)
    assert catalog.cost("own-gpu", 10_000, 10_000) == 0.0  # tokens are free on own GPUs


def test_token_and_busy_prices_add_up() -> None:
    price = ModelPrice(input_usd_per_mtok=1.0, output_usd_per_mtok=2.0, usd_per_busy_hour=3600.0)
    assert price.cost(1_000_000, 1_000_000, busy_s=1.0) == pytest.approx(1.0 + 2.0 + 1.0)


def test_embedded_model_ships_with_a_small_cpu_hour_price() -> None:
    catalog = PriceCatalog.from_config(config())
    price = catalog.price("smollm2-135m")
    assert price.usd_per_busy_hour == CostConfig().embedded_usd_per_hour == 0.18
    one_second = catalog.cost("smollm2-135m", 50, 20, busy_s=1.0)
    assert 0 < one_second < 1e-4  # non-zero, but tiny: $0.00005


def test_embedded_price_overrides() -> None:
    free = PriceCatalog.from_config(
        StrataConfig.model_validate({"models": [{"kind": "embedded", "gpu_usd_per_hour": 0}]})
    )
    assert free.cost("smollm2-135m", 100, 100, busy_s=10) == 0.0
    assert free.unpriced == ["smollm2-135m"]
    cheaper = PriceCatalog.from_config(StrataConfig.model_validate({"cost": {"embedded_usd_per_hour": 0.036}}))
    assert cheaper.cost("smollm2-135m", 0, 0, busy_s=100) == pytest.approx(0.001)


def test_unknown_models_cost_nothing_and_unpriced_models_are_listed() -> None:
    catalog = PriceCatalog.from_config(config())
    assert catalog.cost("no-such-model", 10**6, 10**6, busy_s=3600) == 0.0
    assert "no-such-model" not in catalog
    assert catalog.unpriced == ["free"]


def test_catalog_follows_hot_swaps_and_reloads() -> None:
    catalog = PriceCatalog.from_config(config())
    swapped = OpenAIModelConfig(name="gpt", base_url="https://api.example.com/v1", input_usd_per_mtok=5.0)
    catalog.set(swapped)
    assert catalog.cost("gpt", 1_000_000, 0) == pytest.approx(5.0)
    catalog.update([EmbeddedModelConfig()])
    assert "gpt" not in catalog
    assert catalog.price("smollm2-135m").usd_per_busy_hour == 0.18


def test_budget_config_is_validated() -> None:
    budget = BudgetConfig(scope="key", name="*", limit_usd=5)
    assert (budget.period, budget.kind) == ("month", "hard")
    with pytest.raises(ValidationError, match="greater than 0"):
        BudgetConfig(scope="user", name="alice", limit_usd=0)
    with pytest.raises(ValidationError):
        BudgetConfig(scope="team", name="x", limit_usd=1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="set twice"):
        CostConfig(budgets=[budget, BudgetConfig(scope="key", name="*", limit_usd=9)])
    CostConfig(budgets=[budget, BudgetConfig(scope="key", name="*", limit_usd=4, kind="soft")])  # another kind: ok


def test_processor_sharing_splits_busy_time_among_requests_in_flight() -> None:
    clock = FakeClock()
    busy = BusyClock(clock)
    a = busy.start()  # t=100: A alone ...
    clock.now = 102.0
    b = busy.start()  # ... for 2 s; then A and B together ...
    clock.now = 104.0
    assert a.finish() == pytest.approx(2.0 + 1.0)  # ... for 2 s, half each
    clock.now = 105.0
    assert b.finish() == pytest.approx(1.0 + 1.0)  # then B alone for 1 s
    assert busy.in_flight == 0
    clock.now = 200.0  # idle: charged to nobody
    with busy.start() as c:
        clock.now = 200.5
    assert c.busy_s == pytest.approx(0.5)
    assert busy.busy_s_total == pytest.approx(5.5)  # the shares add up to the busy time


def test_shares_add_up_to_the_busy_time_under_any_overlap() -> None:
    clock = FakeClock()
    busy = BusyClock(clock)
    spans, charged = [], 0.0
    for step in range(200):  # a deterministic mix of arrivals and departures
        clock.now += 0.01 * (step % 7 + 1)
        if step % 3 != 2 or not spans:
            spans.append(busy.start())
        else:
            charged += spans.pop(step % len(spans)).finish()
    clock.now += 1.0
    charged += sum(span.finish() for span in spans)
    assert charged == pytest.approx(busy.busy_s_total)


def test_spans_finish_once_and_deployments_have_their_own_clocks() -> None:
    clock = FakeClock()
    shares = GpuTimeShares(clock)
    a = shares.start("gpu-1")
    b = shares.start("gpu-2")  # another deployment: does not share A's time
    clock.now += 3.0
    assert a.finish() == pytest.approx(3.0)
    assert a.finish() == pytest.approx(3.0)  # idempotent: in_flight not decremented twice
    assert shares.clock("gpu-1").in_flight == 0
    assert b.finish() == pytest.approx(3.0)
