"""One request through the resilience machinery: pick a deployment, pass admission control and its
circuit breaker, call it, and on a retryable failure try again (another replica first, with backoff
and within the retry budget and the request's deadline), then the model's fallbacks.

Retryable: connection failures, timeouts before the first byte, 429 and 5xx. Never after a stream
has started: a stream is only handed to the relay once its first chunk has arrived. Never an answer
the request caused (4xx, and a 500 that `serving.faults` recognises): that goes to the client as it
is, and the breaker does not count it, so one client's bad requests cannot shut the others out.

A `Retry-After` from a deployment sends the retry to another deployment at once (and other requests
to the others first, until it has passed); it is waited out only when no other deployment can take
the request. Each attempt picks from the model's version in service, so a retry after a hot swap
goes to the new deployments. When too few breakers of a model without fallbacks are closed, the
model panics (see `serving.pool`): attempts go to deployments whose breaker refuses, too.

Retries, fallbacks, breaker refusals and trips, admission queue waits and refusals are events of the
current span (the call's `chat {model}` span); on the happy path none of that costs anything.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TypeVar

import structlog

from strata.cost.gpu_time import GpuTimeShares
from strata.observability import tracing_genai as genai
from strata.observability.tracing import add_event
from strata.resilience.admission import Overloaded
from strata.resilience.breaker import BreakerState
from strata.resilience.retry import parse_retry_after
from strata.serving.client import UpstreamReply, UpstreamStream
from strata.serving.deployment import Deployment
from strata.serving.errors import (
    BackendNotReadyError,
    CircuitOpenError,
    DeploymentStoppedError,
    OverloadedError,
    ServingError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from strata.serving.pool import ModelPool
from strata.serving.router import Router

log = structlog.get_logger("strata.dispatch")
T = TypeVar("T")
Operation = Callable[[Deployment, float], Awaitable[T]]
FallbackHook = Callable[[str, str, str], None]  # (the model that failed, its fallback, the error)
QUEUE_EVENT_MIN_S = 0.001  # an admission wait shorter than this is no queue wait worth an event


def retryable(exc: ServingError) -> bool:
    if isinstance(exc, UpstreamStatusError):
        return not exc.caused_by_request and (exc.status == 429 or exc.status >= 500)
    return isinstance(exc, UpstreamUnavailableError | UpstreamTimeoutError)


class Dispatcher:
    def __init__(self, router: Router, gpu_time: GpuTimeShares | None = None) -> None:
        self._router = router
        self._gpu_time = gpu_time or GpuTimeShares()

    async def complete(self, model: str, payload: Callable[[Deployment], bytes], path: str,
                       headers: Mapping[str, str], *, allowed: frozenset[str] | None = None,
                       fallbacks: tuple[str, ...] = (),
                       on_fallback: FallbackHook | None = None) -> tuple[Deployment, UpstreamReply]:  # fmt: skip
        busy = 0.0  # every attempt's share of its deployment's time, failed ones included

        async def call(deployment: Deployment, remaining: float) -> UpstreamReply:
            nonlocal busy
            await _admit(deployment)
            share = self._gpu_time.start(deployment.name)
            try:
                return await deployment.client.post_json(path, payload(deployment), headers, timeout_s=remaining)
            finally:
                busy += share.finish()
                deployment.admission.release()

        deployment, reply = await self._run(model, call, allowed, fallbacks, on_fallback)
        return deployment, replace(reply, busy_s=busy)

    async def open_stream(self, model: str, payload: Callable[[Deployment], bytes], path: str,
                          headers: Mapping[str, str], *, allowed: frozenset[str] | None = None,
                          fallbacks: tuple[str, ...] = (),
                          on_fallback: FallbackHook | None = None) -> tuple[Deployment, UpstreamStream]:  # fmt: skip
        async def call(deployment: Deployment, remaining: float) -> UpstreamStream:
            await _admit(deployment)
            share = self._gpu_time.start(deployment.name)
            try:
                stream = await deployment.client.open_stream(path, payload(deployment), headers)
            except BaseException:
                share.finish()
                deployment.admission.release()
                raise

            def closed() -> None:
                stream.busy_s = share.finish()
                deployment.admission.release()  # the slot is held until the stream ends

            stream.on_close(closed)
            try:
                await asyncio.wait_for(stream.prefetch(), remaining)  # a failure before the first byte can retry
            except BaseException as exc:
                stream.close()
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeoutError(
                        "no first byte before the deadline", deployment=deployment.name
                    ) from None
                raise
            return stream

        return await self._run(model, call, allowed, fallbacks, on_fallback)

    async def _run(
        self, model: str, call: Operation[T], allowed: frozenset[str] | None, fallbacks: tuple[str, ...] = (),
        on_fallback: FallbackHook | None = None,
    ) -> tuple[Deployment, T]:  # fmt: skip
        """`fallbacks`: the caller's own (an agent's fallback model), tried after the model's."""
        chain = [model, *self._router.pool(model).fallbacks]
        chain += [name for name in fallbacks if name not in chain]
        if allowed is not None:  # a fallback the caller's key may not use is never tried
            refused = [name for name in chain[1:] if name not in allowed]
            if refused:
                add_event(genai.EVENT_FALLBACK, {"from": model, "skipped": ",".join(refused), "reason": "not allowed"})
                chain = [chain[0], *(name for name in chain[1:] if name in allowed)]
        deadline = time.monotonic() + self._router.pool(model).total_timeout_s
        attempts: list[dict[str, str]] = []
        last: ServingError | None = None
        for index, name in enumerate(chain):
            if index:
                self._router.pool(chain[index - 1]).stats.fallbacks += 1
                log.warning("falling back", model=model, fallback=name, error=last.message if last else None)
                add_event(genai.EVENT_FALLBACK, {"from": chain[index - 1], "to": name, "error": _error(last)})
                if on_fallback is not None:
                    on_fallback(chain[index - 1], name, _error(last))
            try:
                return await self._try_model(name, call, deadline, attempts)
            except ServingError as exc:
                last = exc
                if not (retryable(exc) or isinstance(exc, BackendNotReadyError)):
                    break  # the request itself is wrong: another model would refuse it too
        assert last is not None
        last.attempts = attempts
        raise last

    async def _try_model(
        self, model: str, call: Operation[T], deadline: float, attempts: list[dict[str, str]]
    ) -> tuple[Deployment, T]:
        pool = self._router.pool(model)
        pool.budget.record_request()
        tried: set[str] = set()
        asked_to_wait: dict[str, float] = {}  # deployment -> when the Retry-After it gave this request ends
        attempt = 0
        last: ServingError | Overloaded | None = None
        while True:
            if (current := self._router.pool(model)) is not pool:
                # A hot swap while we waited: retries go to the version in service (the old one is stopping).
                pool, tried, asked_to_wait = current, set(), {}
            panic = pool.panicking
            deployment = pool.pick(exclude=tried, panic=panic)
            if deployment is None:
                error = _nothing_left(model, last, pool)
                if isinstance(error, OverloadedError):
                    pool.stats.overloaded += 1
                elif isinstance(error, CircuitOpenError):
                    pool.stats.circuit_open += 1
                raise error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if isinstance(last, ServingError):
                    raise last
                raise UpstreamTimeoutError(f"the request's deadline passed after {attempt} attempts", deployment=model)
            tried.add(deployment.name)
            try:
                deployment.check_available()
            except BackendNotReadyError as exc:
                last = exc
                attempts.append({"deployment": deployment.name, "error": exc.message})
                continue
            wait = asked_to_wait.get(deployment.name, 0.0) - time.monotonic()
            if wait > 0:
                # It asked this request to come back later, and no other deployment can take it now.
                if wait > pool.retry.retry_after_cap_s or wait >= remaining:
                    raise _nothing_left(model, last, pool)  # too long to hold the client: it gets the Retry-After
                await asyncio.sleep(wait)
                tried.discard(deployment.name)
                continue  # pick again: another deployment may have come back meanwhile
            admitted = await deployment.breaker.allow()  # False in panic: the breaker gets no verdict
            if not admitted:
                if not panic:
                    attempts.append({"deployment": deployment.name, "error": "circuit open"})
                    add_event(genai.EVENT_BREAKER_OPEN, {"deployment": deployment.name})
                    continue
                pool.stats.panic += 1
            attempt += 1
            try:
                result = await call(deployment, remaining)
            except Overloaded as exc:
                await _no_verdict(deployment, admitted)
                last = exc
                attempts.append({"deployment": deployment.name, "error": f"overloaded ({exc.reason})"})
                add_event(genai.EVENT_OVERLOADED, {"deployment": deployment.name, "reason": exc.reason})
                continue  # another replica may have room; being full is no failure of the backend
            except DeploymentStoppedError as exc:
                await _no_verdict(deployment, admitted)
                attempt -= 1  # nothing reached a backend
                last = exc
                attempts.append({"deployment": deployment.name, "error": exc.message})
                continue  # the next pick is from the version in service, if a hot swap stopped this one
            except ServingError as exc:
                pool.faults.classify(exc)
                exc.deployment = exc.deployment or deployment.name
                attempts.append({"deployment": deployment.name, "error": exc.message})
                last = exc
                if not retryable(exc):
                    await _no_verdict(deployment, admitted)  # it answered; the request was at fault
                    raise
                if admitted:
                    await _record_failure(deployment)
                retry_after = parse_retry_after(exc.retry_after) if isinstance(exc, UpstreamStatusError) else None
                if retry_after:
                    deployment.pause(retry_after)  # other requests try the other deployments first, too
                    asked_to_wait[deployment.name] = time.monotonic() + retry_after
                    too_long = retry_after > min(pool.retry.retry_after_cap_s, deadline - time.monotonic())
                    if too_long and pool.pick(exclude={deployment.name}, panic=panic) is None:
                        raise  # nobody else to ask, and too long to hold the client: it gets the Retry-After
                if not pool.retry.should_retry(attempt):
                    raise
                pool.stats.retries += 1
                delay = min(pool.retry.delay(attempt), max(0.0, deadline - time.monotonic()))
                log.info("retrying", model=model, deployment=deployment.name, attempt=attempt,
                         delay_s=round(delay, 3), error=exc.message)  # fmt: skip
                add_event(
                    genai.EVENT_RETRY,
                    {
                        "attempt": attempt,
                        "deployment": deployment.name,
                        "delay_s": round(delay, 3),
                        "error": exc.message[:512],
                        genai.ERROR_TYPE: genai.error_type(exc),
                    },
                )
                if len(tried) >= len(pool.deployments):
                    tried.clear()  # every replica had its turn; the next attempt may reuse one
                await asyncio.sleep(delay)
                continue
            except BaseException:
                await _no_verdict(deployment, admitted)
                raise
            if admitted:
                await deployment.breaker.record_success()
            return deployment, result


async def _admit(deployment: Deployment) -> None:
    """Take an admission slot; a wait in its queue becomes an event of the current span."""
    started = time.perf_counter()
    await deployment.admission.acquire()
    waited = time.perf_counter() - started
    if waited >= QUEUE_EVENT_MIN_S:
        add_event(genai.EVENT_QUEUE_WAIT, {"deployment": deployment.name, "wait_s": round(waited, 4)})


async def _no_verdict(deployment: Deployment, admitted: bool) -> None:
    """The attempt says nothing about the backend's health: give back a probe slot it may hold."""
    if admitted:
        await deployment.breaker.release_probe()


async def _record_failure(deployment: Deployment) -> None:
    """Count a failure against the deployment's breaker; if that opens it, say so on the current span."""
    breaker = deployment.breaker
    before = breaker.state
    await breaker.record_failure()
    if before is not BreakerState.OPEN and breaker.state is BreakerState.OPEN:
        add_event(genai.EVENT_BREAKER_TRIPPED, {"deployment": deployment.name})


def _error(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    return str(getattr(exc, "message", None) or exc)[:512]


def _nothing_left(model: str, last: ServingError | Overloaded | None, pool: ModelPool) -> ServingError:
    """The error to report when no deployment is left to try."""
    if isinstance(last, Overloaded):
        return OverloadedError(
            f"every deployment of {model!r} is at capacity ({last.reason}); retry later",
            deployment=model,
            retry_after_s=last.retry_after_s,
        )
    if last is not None:
        return last
    # Retry-After: when the first of them lets a probe through (whole seconds, as the header has them).
    next_probe = min((d.breaker.retry_in_s for d in pool.deployments), default=1.0)
    return CircuitOpenError(
        f"no deployment of {model!r} can take requests now: their circuit breakers are open",
        deployment=model,
        retry_after_s=max(1, math.ceil(next_probe)),
    )
