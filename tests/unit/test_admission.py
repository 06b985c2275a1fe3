"""Admission control: concurrency limit, FIFO queue, refusals, cancellation safety, no leaks under load."""

from __future__ import annotations

import asyncio
import random

import pytest

from strata.config import AdmissionConfig
from strata.resilience.admission import AdmissionController, Overloaded


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_exactly_max_in_flight_run_at_once_and_the_rest_wait() -> None:
    controller = AdmissionController(max_in_flight=3, max_queue=100, max_queue_wait_s=60)
    gate = asyncio.Event()
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        async with controller.admit():
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

    tasks = [asyncio.create_task(work()) for _ in range(10)]
    await settle()
    assert (running, controller.in_flight, controller.queued) == (3, 3, 7)
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == 3
    assert (controller.in_flight, controller.queued) == (0, 0)


async def test_waiters_are_admitted_in_arrival_order() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=10, max_queue_wait_s=60)
    await controller.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        async with controller.admit():
            order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(wait(i)))
        await settle()  # queue them one after another
    assert controller.queued == 5
    controller.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (controller.in_flight, controller.queued) == (0, 0)


async def test_a_released_slot_goes_to_the_longest_waiter_not_a_newcomer() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=10, max_queue_wait_s=60)
    await controller.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await controller.acquire()
        order.append(name)
        controller.release()

    waiter = asyncio.create_task(take("waiter"))
    await settle()
    controller.release()  # handed to the waiter, which has not resumed yet...
    assert controller.in_flight == 1  # ...so the slot stays taken
    await take("newcomer")  # runs before the waiter resumes: it must queue, not slip in
    await waiter
    assert order == ["waiter", "newcomer"]
    assert (controller.in_flight, controller.queued) == (0, 0)


async def test_a_full_queue_refuses_at_once() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=2, max_queue_wait_s=600)
    await controller.acquire()
    waiters = [asyncio.create_task(controller.acquire()) for _ in range(2)]
    await settle()
    refused = asyncio.create_task(controller.acquire())
    await asyncio.sleep(0)  # one step of the loop, nowhere near the 600 s wait
    assert refused.done()
    error = refused.exception()
    assert isinstance(error, Overloaded)
    assert error.reason == "queue_full"
    assert (error.in_flight, error.queued) == (1, 2)
    assert error.retry_after_s >= 1.0
    assert controller.queued == 2  # the refused request took no place
    for _ in range(3):
        controller.release()
    await asyncio.gather(*waiters)
    assert (controller.in_flight, controller.queued) == (0, 0)


@pytest.mark.parametrize(("max_queue", "wait_s"), [(0, 5.0), (5, 0.0)])
async def test_no_queue_means_refusal_at_once_when_all_slots_are_taken(max_queue: int, wait_s: float) -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=max_queue, max_queue_wait_s=wait_s)
    async with controller.admit():
        with pytest.raises(Overloaded) as info:
            await controller.acquire()
        assert info.value.reason == "queue_full"
    async with controller.admit():  # a free slot is still taken at once
        assert controller.in_flight == 1
    assert controller.in_flight == 0


async def test_a_waiter_that_waits_too_long_is_refused_and_leaves_the_queue() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=5, max_queue_wait_s=0.05)
    await controller.acquire()
    with pytest.raises(Overloaded) as info:
        await controller.acquire()
    assert info.value.reason == "queue_timeout"
    assert info.value.retry_after_s >= 1.0
    assert (controller.in_flight, controller.queued) == (1, 0)  # the holder keeps its slot, nothing queued
    controller.release()
    assert controller.in_flight == 0


async def test_cancelling_a_queued_waiter_frees_its_place() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=1, max_queue_wait_s=60)
    await controller.acquire()
    first = asyncio.create_task(controller.acquire())
    await settle()
    assert controller.queued == 1
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (controller.in_flight, controller.queued) == (1, 0)
    second = asyncio.create_task(controller.acquire())  # the place is free again: no queue_full
    await settle()
    assert controller.queued == 1
    controller.release()
    await second
    assert (controller.in_flight, controller.queued) == (1, 0)
    controller.release()
    assert controller.in_flight == 0


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_passes_to_the_next() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=5, max_queue_wait_s=60)
    await controller.acquire()
    first = asyncio.create_task(controller.acquire())
    await settle()
    second = asyncio.create_task(controller.acquire())
    await settle()
    controller.release()  # the slot is handed to `first`...
    first.cancel()  # ...which is cancelled before it could resume
    with pytest.raises(asyncio.CancelledError):
        await first
    await second  # the slot went on to `second` instead of being lost
    assert (controller.in_flight, controller.queued) == (1, 0)
    controller.release()
    assert controller.in_flight == 0


async def test_a_slot_handed_to_a_cancelled_last_waiter_is_returned() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=5, max_queue_wait_s=60)
    await controller.acquire()
    only = asyncio.create_task(controller.acquire())
    await settle()
    controller.release()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    assert (controller.in_flight, controller.queued) == (0, 0)
    async with controller.admit():  # and it can be taken again
        assert controller.in_flight == 1


async def test_the_slot_is_released_when_the_block_raises() -> None:
    controller = AdmissionController(max_in_flight=1, max_queue=0, max_queue_wait_s=0)
    with pytest.raises(ValueError):
        async with controller.admit():
            raise ValueError("boom")
    assert controller.in_flight == 0
    with pytest.raises(RuntimeError):
        controller.release()  # one release too many is a bug, not a silent negative count


async def test_retry_after_follows_recent_queue_waits() -> None:
    clock = FakeClock()
    controller = AdmissionController(max_in_flight=1, max_queue=1, max_queue_wait_s=600, clock=clock)
    await controller.acquire()
    waiter = asyncio.create_task(controller.acquire())
    await settle()
    with pytest.raises(Overloaded) as idle:
        await controller.acquire()
    assert idle.value.retry_after_s == 1.0  # no waits seen yet: the floor
    for _ in range(20):  # waiters that each waited 30 s
        clock.now += 30.0
        controller.release()
        await waiter
        waiter = asyncio.create_task(controller.acquire())
        await settle()
    with pytest.raises(Overloaded) as busy:
        await controller.acquire()
    assert 20.0 <= busy.value.retry_after_s <= 60.0
    assert busy.value.retry_after_s == int(busy.value.retry_after_s)  # whole seconds, as Retry-After wants
    waiter.cancel()
    controller.release()


async def test_no_leak_after_a_storm_of_10000_attempts() -> None:
    controller = AdmissionController(max_in_flight=8, max_queue=32, max_queue_wait_s=0.05)
    rng = random.Random(3)
    outcomes = {"admitted": 0, "queue_full": 0, "queue_timeout": 0, "cancelled": 0}
    running = peak = max_queued = 0

    async def attempt() -> None:
        nonlocal running, peak, max_queued
        max_queued = max(max_queued, controller.queued)
        try:
            async with controller.admit():
                running += 1
                peak = max(peak, running)
                try:
                    for _ in range(rng.randint(0, 3)):
                        await asyncio.sleep(0)
                finally:
                    running -= 1
        except Overloaded as refused:
            outcomes[refused.reason] += 1
        else:
            outcomes["admitted"] += 1

    tasks = []
    for i in range(10_000):
        tasks.append(asyncio.create_task(attempt()))
        if i % 7 == 0:
            tasks[-rng.randint(1, min(len(tasks), 40))].cancel()  # clients hanging up, queued or running
        if i % 4 == 0:
            await asyncio.sleep(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert sum(outcomes.values()) == 10_000
    assert outcomes["admitted"] > 0 and outcomes["queue_full"] > 0 and outcomes["cancelled"] > 0
    assert peak <= 8
    assert max_queued <= 32
    assert (controller.in_flight, controller.queued) == (0, 0)
    async with controller.admit():  # still fully usable
        assert controller.in_flight == 1


def test_from_config_and_nonsense_settings() -> None:
    controller = AdmissionController.from_config(AdmissionConfig(max_in_flight=2, max_queue=3, max_queue_wait_s=1))
    assert (controller.in_flight, controller.queued) == (0, 0)
    with pytest.raises(ValueError):
        AdmissionController(max_in_flight=0, max_queue=1, max_queue_wait_s=1)
