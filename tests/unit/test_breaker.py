"""The circuit breaker on the in-process store, driven by an injected clock: no sleeping."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from strata.config import BreakerConfig
from strata.resilience.breaker import (
    BreakerState,
    BreakerStoreError,
    CircuitBreaker,
    MemoryBreakerStore,
    ProbeClaim,
    ProbeVerdict,
    SharedState,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Upstream:
    """Counts the calls that got past the breaker, so fail-fast is observable."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, breaker: CircuitBreaker, ok: bool) -> bool:
        if not await breaker.allow():
            return False
        self.calls += 1
        if ok:
            await breaker.record_success()
        else:
            await breaker.record_failure()
        return True


class FlakyStore:
    """A shared memory store that can be switched off, and counts what reached it."""

    def __init__(self, inner: MemoryBreakerStore) -> None:
        self.inner = inner
        self.down = False
        self.calls = 0

    def __getattr__(self, method: str) -> Any:
        target = getattr(self.inner, method)

        async def call(*args: Any) -> Any:
            self.calls += 1
            if self.down:
                raise BreakerStoreError("store is down")
            return await target(*args)

        return call


def config(**overrides: Any) -> BreakerConfig:
    values: dict[str, Any] = {
        "consecutive_failures": 3,
        "failure_rate": 0.5,
        "min_requests": 10,
        "window_s": 10.0,
        "open_s": 5.0,
        "half_open_probes": 1,
    }
    return BreakerConfig(**(values | overrides))


def breaker(clock: FakeClock, **overrides: Any) -> CircuitBreaker:
    return CircuitBreaker("dep", config(**overrides), MemoryBreakerStore(clock), clock)


async def trip(b: CircuitBreaker, failures: int = 3) -> None:
    for _ in range(failures):
        assert await b.allow()
        await b.record_failure()
    assert b.state is BreakerState.OPEN


async def test_consecutive_failures_open_it() -> None:
    clock = FakeClock()
    b = breaker(clock, min_requests=1000)
    for _ in range(2):
        assert await b.allow()
        await b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert await b.allow()
    await b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not await b.allow()


async def test_a_success_resets_the_consecutive_count() -> None:
    clock = FakeClock()
    b = breaker(clock, min_requests=1000)
    upstream = Upstream()
    for ok in (False, False, True, False, False):
        assert await upstream.call(b, ok)
    assert b.state is BreakerState.CLOSED
    assert (await b.snapshot()).consecutive_failures == 2


async def test_failure_rate_opens_only_after_min_requests() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100, min_requests=10, failure_rate=0.5)
    upstream = Upstream()
    # 9 requests, 6 of them failures (67%): too few requests for the rate to count yet.
    for ok in (False, False, True, False, False, True, False, False, True):
        assert await upstream.call(b, ok)
    assert b.state is BreakerState.CLOSED
    assert await upstream.call(b, False)  # 7 of 10
    assert b.state is BreakerState.OPEN
    assert not await b.allow()


async def test_a_failure_rate_exactly_at_the_threshold_opens_it() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100, min_requests=10, failure_rate=0.5)
    upstream = Upstream()
    for ok in (False, True, False, True, False, True, False, True, True):
        assert await upstream.call(b, ok)
    assert b.state is BreakerState.CLOSED
    assert await upstream.call(b, False)  # 5 of 10 = failure_rate
    assert b.state is BreakerState.OPEN


async def test_failure_rate_below_threshold_stays_closed() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100, min_requests=10, failure_rate=0.5)
    upstream = Upstream()
    for i in range(40):
        assert await upstream.call(b, i % 3 != 0)  # a third fail
    assert b.state is BreakerState.CLOSED


async def test_old_failures_leave_the_window() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100, min_requests=4, failure_rate=0.5, window_s=10.0)
    upstream = Upstream()
    for _ in range(3):
        assert await upstream.call(b, False)
    clock.advance(11.0)
    for ok in (True, True, True, False):
        assert await upstream.call(b, ok)
    # Counting the expired failures it would be 4 of 7; in the window it is 1 of 4.
    snapshot = await b.snapshot()
    assert (snapshot.window_failures, snapshot.window_requests) == (1, 4)
    assert b.state is BreakerState.CLOSED


async def test_open_fails_fast_without_calling_upstream() -> None:
    clock = FakeClock()
    b = breaker(clock, open_s=5.0)
    upstream = Upstream()
    for _ in range(3):
        await upstream.call(b, False)
    assert upstream.calls == 3
    clock.advance(4.9)
    for _ in range(50):
        assert not await upstream.call(b, True)
    assert upstream.calls == 3
    snapshot = await b.snapshot()
    assert snapshot.state is BreakerState.OPEN
    assert abs(snapshot.retry_in_s - 0.1) < 1e-6
    assert snapshot.opened_at == 1000.0


async def test_half_open_admits_exactly_the_configured_probes() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_probes=2)
    await trip(b)
    clock.advance(5.0)
    assert b.state is BreakerState.HALF_OPEN
    assert [await b.allow() for _ in range(4)] == [True, True, False, False]
    assert (await b.snapshot()).probes_in_flight == 2
    await b.release_probe()  # one probe's client went away: its slot is free again
    assert await b.allow()
    assert not await b.allow()


async def test_probe_success_closes_and_resets_counters() -> None:
    clock = FakeClock()
    b = breaker(clock)
    await trip(b)
    clock.advance(5.0)
    assert await b.allow()
    await b.record_success()
    snapshot = await b.snapshot()
    assert snapshot.state is BreakerState.CLOSED
    assert (snapshot.consecutive_failures, snapshot.window_failures, snapshot.window_requests) == (0, 0, 0)
    assert snapshot.opened_at is None
    assert all([await b.allow() for _ in range(10)])
    # It takes a full new run of failures to open it again.
    for _ in range(2):
        await b.record_failure()
    assert b.state is BreakerState.CLOSED


async def test_probe_failure_reopens_for_another_open_period() -> None:
    clock = FakeClock()
    b = breaker(clock, open_s=5.0)
    await trip(b)
    clock.advance(5.0)
    assert await b.allow()
    await b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not await b.allow()
    clock.advance(4.9)
    assert not await b.allow()
    clock.advance(0.1)
    assert b.state is BreakerState.HALF_OPEN
    assert await b.allow()


async def test_late_results_while_open_do_not_change_it() -> None:
    clock = FakeClock()
    b = breaker(clock, open_s=5.0)
    await trip(b)
    await b.record_success()  # a request let in before the trip, finishing now
    assert b.state is BreakerState.OPEN
    clock.advance(3.0)
    await b.record_failure()
    clock.advance(2.0)
    assert b.state is BreakerState.HALF_OPEN, "a late failure must not extend the open period"


async def test_closed_hot_path_does_not_touch_the_store_between_syncs() -> None:
    clock = FakeClock()
    store = FlakyStore(MemoryBreakerStore(clock))
    b = CircuitBreaker("dep", config(consecutive_failures=1000, min_requests=1000), store, clock, sync_interval_s=1.0)
    upstream = Upstream()
    await upstream.call(b, True)
    before = store.calls
    for i in range(500):
        await upstream.call(b, i % 2 == 0)
    assert store.calls == before
    clock.advance(1.0)
    await b.allow()
    assert store.calls == before + 1


async def test_two_breakers_on_one_store_share_the_state() -> None:
    clock = FakeClock()
    store = MemoryBreakerStore(clock)
    a = CircuitBreaker("dep", config(), store, clock, sync_interval_s=0.5)
    b = CircuitBreaker("dep", config(), store, clock, sync_interval_s=0.5)
    other = CircuitBreaker("other", config(), store, clock, sync_interval_s=0.5)
    assert await b.allow() and await other.allow()
    await trip(a)
    clock.advance(0.5)
    assert not await b.allow()
    assert b.state is BreakerState.OPEN
    assert await other.allow(), "another deployment's breaker is not affected"
    clock.advance(4.5)
    # Half-open: one probe in all, whoever asks first.
    assert await b.allow()
    assert not await a.allow()
    await b.record_success()
    clock.advance(0.5)
    assert await a.allow()
    assert a.state is BreakerState.CLOSED


async def test_store_failure_falls_back_to_local_state_and_warns_once() -> None:
    clock = FakeClock()
    store = FlakyStore(MemoryBreakerStore(clock))
    store.down = True
    b = CircuitBreaker("dep", config(), store, clock, sync_interval_s=0.1)
    with capture_logs() as logs:
        await trip(b)
        assert not await b.allow()
        clock.advance(5.0)
        assert await b.allow()
        assert not await b.allow(), "the probe limit holds locally too"
        await b.record_success()
        assert b.state is BreakerState.CLOSED
        snapshot = await b.snapshot()
    assert snapshot.store_ok is False
    warnings = [entry for entry in logs if entry["event"] == "breaker store unavailable, using local state"]
    assert len(warnings) == 1


async def test_a_trip_made_while_the_store_was_down_is_published_when_it_returns() -> None:
    clock = FakeClock()
    shared = MemoryBreakerStore(clock)
    flaky = FlakyStore(shared)
    a = CircuitBreaker("dep", config(), flaky, clock, sync_interval_s=0.5)
    b = CircuitBreaker("dep", config(), shared, clock, sync_interval_s=0.5)
    flaky.down = True
    await trip(a)
    flaky.down = False
    clock.advance(0.5)
    assert not await a.allow(), "the store coming back must not close a local trip"
    assert not await b.allow(), "the other replica learns of the trip"
    assert b.state is BreakerState.OPEN
    assert (await a.snapshot()).store_ok


async def test_memory_store_claims_are_atomic_and_tokened() -> None:
    clock = FakeClock()
    store = MemoryBreakerStore(clock)
    assert await store.claim_probe("dep", 1, 10.0) == (ProbeClaim.CLOSED, SharedState())
    state = await store.trip("dep", "t1", 5.0)
    assert state == SharedState("t1", 5.0)
    assert (await store.trip("dep", "t2", 5.0)).trip == "t1", "an open breaker is not re-tripped"
    assert (await store.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.OPEN
    clock.advance(5.0)
    assert (await store.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.GRANTED
    assert (await store.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.FULL
    clock.advance(10.0)  # the probe's holder vanished: its lease expires
    assert (await store.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.GRANTED
    success = ProbeVerdict(True, close_after=1, reopen_after=1, reopen_token="t3", open_s=5.0)
    assert (await store.probe_verdict("dep", "stale-trip", success)).trip == "t1", "an older trip's verdict is ignored"
    assert (await store.claim_probe("dep", 1, 10.0))[0] is ProbeClaim.FULL, "... and frees no slot"
    assert await store.probe_verdict("dep", "t1", success) == SharedState()
    assert await store.read("dep") == SharedState()


async def test_memory_store_counts_verdicts_of_one_open_period_to_a_decision() -> None:
    clock = FakeClock()
    store = MemoryBreakerStore(clock)
    await store.trip("dep", "t1", 5.0)
    clock.advance(5.0)

    def verdict(ok: bool) -> ProbeVerdict:
        return ProbeVerdict(ok, close_after=3, reopen_after=3, reopen_token="t2", open_s=7.0)

    for _ in range(5):
        assert (await store.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.GRANTED
    for ok in (False, True, False, True):
        assert await store.probe_verdict("dep", "t1", verdict(ok)) == SharedState("t1", 0.0)
    assert (await store.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.GRANTED, "each verdict freed its slot"
    assert await store.probe_verdict("dep", "t1", verdict(False)) == SharedState("t2", 7.0), "3rd failure"
    assert (await store.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.OPEN
    clock.advance(7.0)
    assert (await store.claim_probe("dep", 5, 10.0))[0] is ProbeClaim.GRANTED, "the new period counts afresh"
    for _ in range(2):
        assert (await store.probe_verdict("dep", "t2", verdict(True))).trip == "t2"
    assert await store.probe_verdict("dep", "t2", verdict(True)) == SharedState()


# -- the failure rate, not a run of bad luck, trips it at traffic; probes decide by their rate ---------------


async def test_a_run_of_failures_at_traffic_does_not_trip_it_below_the_failure_rate() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=3, min_requests=10, failure_rate=0.5)
    upstream = Upstream()
    for _ in range(10):
        assert await upstream.call(b, True)
    for _ in range(9):  # nine in a row: 9 of 19 is still below half
        assert await upstream.call(b, False)
    assert b.state is BreakerState.CLOSED
    assert await upstream.call(b, False)  # 10 of 20
    assert b.state is BreakerState.OPEN


async def test_a_replica_failing_30_percent_under_load_stays_closed() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=5, min_requests=20, failure_rate=0.5, window_s=10.0)
    upstream = Upstream()
    # 170 requests a second for a minute, failing in runs of six out of every twenty: 30%.
    for i in range(170 * 60):
        clock.advance(1 / 170)
        assert await upstream.call(b, i < 20 or i % 20 >= 6)
    assert b.state is BreakerState.CLOSED
    snapshot = await b.snapshot()
    assert 0.25 < snapshot.window_failures / snapshot.window_requests < 0.35


async def test_a_run_of_failures_trips_it_only_at_low_traffic() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=3, min_requests=10, failure_rate=0.5, window_s=10.0)
    upstream = Upstream()
    for _ in range(10):
        assert await upstream.call(b, True)
    for _ in range(3):
        assert await upstream.call(b, False)
    assert b.state is BreakerState.CLOSED, "at traffic the rate decides: 3 of 13"
    clock.advance(11.0)  # the traffic is gone from the window: low traffic again, runs count
    assert await upstream.call(b, True)
    for _ in range(2):
        assert await upstream.call(b, False)
    assert b.state is BreakerState.CLOSED
    assert await upstream.call(b, False)
    assert b.state is BreakerState.OPEN


async def test_half_open_lets_several_probes_through_and_closes_on_their_successes() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_probes=5, failure_rate=0.5, open_s=5.0)
    await trip(b)
    clock.advance(5.0)
    assert [await b.allow() for _ in range(6)] == [True] * 5 + [False]
    # ceil(0.5 * 5) = 3 failed probes would re-open it; so 3 successful ones close it.
    for ok in (True, False, True):
        await (b.record_success() if ok else b.record_failure())
    assert b.state is BreakerState.HALF_OPEN
    assert await b.allow(), "a slot freed by a verdict takes the next probe"
    await b.record_success()
    assert b.state is BreakerState.CLOSED
    assert all([await b.allow() for _ in range(20)])


async def test_one_failed_probe_does_not_re_open_a_backend_that_mostly_works() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_probes=5, failure_rate=0.5)
    await trip(b)
    clock.advance(5.0)
    upstream = Upstream()
    for ok in (False, True, False, True, True):
        assert await upstream.call(b, ok)
    assert b.state is BreakerState.CLOSED


async def test_probes_failing_at_the_failure_rate_re_open_it_for_another_period() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_probes=5, failure_rate=0.5, open_s=5.0)
    await trip(b)
    clock.advance(5.0)
    upstream = Upstream()
    for ok in (False, True, False, True, False):
        assert await upstream.call(b, ok)
    assert b.state is BreakerState.OPEN
    assert b.retry_in_s == 5.0
    assert not await upstream.call(b, True)
    clock.advance(5.0)
    # The new period starts its count afresh: three successes close it.
    for _ in range(3):
        assert await upstream.call(b, True)
    assert b.state is BreakerState.CLOSED


async def test_retry_in_s_says_when_the_next_probe_is_due() -> None:
    clock = FakeClock()
    b = breaker(clock, half_open_probes=2, open_s=5.0)
    assert b.retry_in_s == 0.0
    await trip(b)
    assert b.retry_in_s == 5.0
    clock.advance(3.5)
    assert abs(b.retry_in_s - 1.5) < 1e-9
    clock.advance(1.5)
    assert b.retry_in_s == 0.0, "half-open with a free probe slot: now"
    assert await b.allow() and await b.allow()
    assert 0 < b.retry_in_s <= 1.0, "every slot taken: shortly"
    assert (await b.snapshot()).retry_in_s == b.retry_in_s


async def test_probes_of_two_replicas_add_up_to_one_decision() -> None:
    clock = FakeClock()
    store = MemoryBreakerStore(clock)
    a = CircuitBreaker("dep", config(half_open_probes=5), store, clock, sync_interval_s=0.5)
    b = CircuitBreaker("dep", config(half_open_probes=5), store, clock, sync_interval_s=0.5)
    await trip(a)
    clock.advance(5.0)
    assert [await a.allow() for _ in range(3)] == [True] * 3
    assert [await b.allow() for _ in range(3)] == [True, True, False], "five probes in all"
    await a.record_success()
    await b.record_success()
    assert a.state is BreakerState.HALF_OPEN
    await a.record_success()  # the third success, of two replicas
    assert a.state is BreakerState.CLOSED
    clock.advance(0.5)
    assert await b.allow()
    assert b.state is BreakerState.CLOSED
    await b.record_failure()  # its last probe's late verdict: a failure of the closed breaker now
    assert b.state is BreakerState.CLOSED


async def test_with_the_store_down_this_replicas_probes_decide() -> None:
    clock = FakeClock()
    store = FlakyStore(MemoryBreakerStore(clock))
    b = CircuitBreaker("dep", config(half_open_probes=3, failure_rate=0.5), store, clock, sync_interval_s=0.1)
    await trip(b)
    store.down = True
    clock.advance(5.0)
    upstream = Upstream()
    for ok in (False, True):
        assert await upstream.call(b, ok)
    assert b.state is BreakerState.HALF_OPEN
    assert await upstream.call(b, False)  # ceil(0.5 * 3) = 2 failures
    assert b.state is BreakerState.OPEN
    assert not (await b.snapshot()).store_ok
