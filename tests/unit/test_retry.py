"""Retry backoff, Retry-After handling and the retry budget, all on injected clocks and random sources."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from strata.config import RetryConfig
from strata.resilience.retry import RetryBudget, RetryPolicy, parse_retry_after


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(
    *, rng: random.Random | None = None, fixed: float | None = None, budget: RetryBudget | None = None, **config: float
) -> RetryPolicy:
    cfg = RetryConfig(**config)
    source = (lambda: fixed) if fixed is not None else (rng or random.Random(7)).random
    return RetryPolicy(cfg, budget or RetryBudget.from_config(cfg, FakeClock()), source)  # type: ignore[arg-type]


# --- backoff -----------------------------------------------------------------------------------


def test_full_jitter_stays_within_the_exponential_ceiling_and_uses_all_of_it() -> None:
    retry = policy(rng=random.Random(1), backoff_initial_s=0.1, backoff_max_s=5.0, max_attempts=10)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (6, 3.2), (7, 5.0), (10, 5.0)]:
        delays = [retry.delay(attempt) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # full jitter: the whole range is used, not just a band near the ceiling
        assert min(delays) < 0.05 * ceiling
        assert max(delays) > 0.95 * ceiling


def test_backoff_doubles_per_attempt_until_the_cap() -> None:
    retry = policy(fixed=0.5, backoff_initial_s=0.1, backoff_max_s=1.0, max_attempts=10)
    assert [retry.delay(a) for a in range(1, 7)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    assert retry.delay(10_000) == pytest.approx(0.5)  # a huge attempt number neither overflows nor exceeds the cap


def test_zero_jitter_draw_retries_at_once() -> None:
    assert policy(fixed=0.0).delay(3) == 0.0


def test_attempt_numbers_count_from_one() -> None:
    with pytest.raises(ValueError):
        policy().delay(0)


# --- Retry-After -------------------------------------------------------------------------------


def test_upstream_retry_after_replaces_the_jittered_backoff() -> None:
    retry = policy(fixed=0.0, backoff_max_s=5.0)
    assert retry.delay(1, retry_after=2.5) == 2.5
    assert retry.delay(3, retry_after=0.0) == 0.0
    assert retry.delay(1, retry_after=-4.0) == 0.0


def test_retry_after_longer_than_the_cap_is_not_retried_early() -> None:
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_per_s=1.0, clock=FakeClock())
    retry = policy(budget=budget, backoff_max_s=5.0, max_attempts=3)
    assert retry.retry_after_cap_s == 5.0
    assert retry.should_retry(1, retry_after=60.0) is False
    assert budget.retries_in_window == 0  # a refusal for another reason spends nothing
    assert retry.should_retry(1, retry_after=5.0) is True
    assert retry.delay(1, retry_after=60.0) == 5.0  # defensive clamp if a caller asks anyway


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), (" 120 ", 120.0), ("0", 0.0), ("1.5", 1.5)],
)
def test_parse_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize("value", [None, "", "  ", "-1", "soon", "nan", "inf", "Wed, 99 Foo 2015"])
def test_parse_retry_after_rejects_garbage(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 45) == pytest.approx(45.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", now=1445412480.0 - 45) == pytest.approx(45.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0  # already past: retry now


# --- attempts cap --------------------------------------------------------------------------------


def test_attempts_stop_at_max_attempts() -> None:
    retry = policy(max_attempts=3, budget_min_per_s=100.0)
    assert [retry.should_retry(a) for a in (1, 2, 3, 4)] == [True, True, False, False]
    assert policy(max_attempts=1).should_retry(1) is False


def test_should_retry_spends_the_budget() -> None:
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_per_s=0.1, clock=FakeClock())  # one retry per window
    retry = policy(budget=budget, max_attempts=5)
    assert retry.should_retry(1) is True
    assert retry.should_retry(1) is False
    assert budget.refused == 1


# --- budget --------------------------------------------------------------------------------------


def test_budget_refuses_a_retry_storm_when_every_request_fails() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=1.0, clock=clock)
    retries = 0
    for _ in range(1000):
        budget.record_request()
        while budget.try_spend():  # a client that would retry forever
            retries += 1
            assert budget.retries_in_window <= 0.2 * budget.requests_in_window + 1.0 * 10.0
    assert retries == 210  # 0.2 * 1000 + 1/s * 10 s, not 1000 * (max_attempts - 1)
    assert budget.refused == 1000


def test_budget_holds_within_every_window_as_requests_keep_arriving() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_s=2.0, min_per_s=5.0, clock=clock)
    spent_at: list[float] = []
    for i in range(20_000):  # 20 s of 1000 failing requests per second, each wanting two retries
        clock.now = 1000.0 + i / 1000
        budget.record_request()
        for _ in range(2):
            if budget.try_spend():
                spent_at.append(clock.now)
    # in any 2 s window: at most 0.1 * 2000 requests + 5/s * 2 s = 210 retries, plus the share of one
    # 0.2 s bucket, since the budget's window slides in bucket steps
    limit = 0.1 * (2000 + 200) + 10
    start = 0
    for end, t in enumerate(spent_at):
        while spent_at[start] <= t - 2.0:
            start += 1
        assert end - start + 1 <= limit
    assert len(spent_at) <= 0.1 * 20_000 + 5 * 20 + 10  # nowhere near the 40,000 retries asked for


def test_budget_recovers_as_the_window_slides() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_per_s=1.0, clock=clock)
    assert sum(budget.try_spend() for _ in range(50)) == 10
    clock.now = 5.0
    assert budget.try_spend() is False  # still inside the window
    clock.now = 10.0
    assert budget.retries_in_window == 0
    assert sum(budget.try_spend() for _ in range(50)) == 10  # a fresh window, again only the reserve
    clock.now = 10.0 + 3600 * 24  # a long idle gap expires everything at once
    assert budget.retries_in_window == 0 and budget.requests_in_window == 0
    assert budget.try_spend() is True


def test_requests_earn_retries_only_while_they_are_in_the_window() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.5, window_s=10.0, min_per_s=0.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    clock.now = 9.9
    assert sum(budget.try_spend() for _ in range(10)) == 5
    clock.now = 20.0  # the requests (and retries) slid out
    assert budget.try_spend() is False


def test_zero_budget_never_retries() -> None:
    budget = RetryBudget(ratio=0.0, window_s=1.0, min_per_s=0.0, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert budget.try_spend() is False


@pytest.mark.parametrize(
    "args", [(-0.1, 10.0, 1.0), (0.2, 0.0, 1.0), (0.2, 10.0, -1.0)], ids=["ratio", "window", "min_per_s"]
)
def test_budget_rejects_nonsense_settings(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(*args, clock=FakeClock())


def test_one_backoff_doubles_to_its_cap_and_jitters_within_its_share() -> None:
    from strata.resilience.retry import backoff

    assert [backoff(n, 0.5, 3.0, jitter=0) for n in (1, 2, 3, 4, 40, 10_000)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert backoff(2, 0.5, 3.0, rng=lambda: 0.0) == 0.0  # full jitter: anywhere from nothing
    assert backoff(2, 0.5, 3.0, jitter=0.5, rng=lambda: 0.0) == 0.5  # half: at least half the wait
    assert backoff(2, 0.5, 3.0, jitter=0.5, rng=lambda: 1.0) == 1.0
