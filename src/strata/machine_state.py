"""State the worker processes of one `strata serve` share when there is no Redis: rate-limit counters, circuit
breakers and budget counters, kept by the supervisor process and reached over a Unix socket.

Why the supervisor and not SQLite or shared memory: a rate limit is checked on every request, and SQLite would
turn that into a write transaction that the N workers queue for (the database's one writer lock, which the run
store and the usage writer also need). Shared memory would need a hand-made cross-process hash table and locks.
The supervisor already outlives every worker, so it holds the same in-memory stores one process uses
(`limits`' memory storage, `MemoryBreakerStore`, the budgets' memory counters) and answers each operation as one
atomic step on its event loop: one loopback round trip (tens of microseconds), as with Redis. With `redis_url`
set none of this runs: Redis is shared by every worker and every replica.

Frames are a 4-byte big-endian length and an orjson array: `[id, op, *args]` one way, `[id, ok, result]` back;
a worker pipelines any number of calls on one connection. When the supervisor cannot be reached the callers
fail open as they do when Redis is down (their own error types: `StorageError`, `BreakerStoreError`, `RedisError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
from limits.errors import StorageError
from redis.exceptions import RedisError

from strata.resilience.breaker import BreakerStoreError, MemoryBreakerStore, ProbeClaim, ProbeVerdict, SharedState

log = structlog.get_logger("strata.machine_state")
_HEADER = struct.Struct(">I")
CALL_TIMEOUT_S = 0.5  # as the Redis clients' socket timeout: a stuck supervisor must not hold requests


def _state(shared: SharedState) -> list[Any]:
    return [shared.trip, shared.open_remaining_s]


class MachineStateServer:
    """In the supervisor: the stores, served to the workers on `path`."""

    def __init__(self, path: Path) -> None:
        from strata.cost.budgets import _MemoryCounters
        from strata.security.rate_limit import _MemoryStorage

        self.path = path
        self.counters = _MemoryStorage(wrap_exceptions=True)
        self.breakers = MemoryBreakerStore()
        self.budgets = _MemoryCounters(lambda: datetime.now(UTC))
        self._server: asyncio.Server | None = None
        self._ops: dict[str, Callable[..., Any]] = {
            "incr": self.counters.incr,
            "get": self.counters.get,
            "b.read": self._read,
            "b.trip": self._trip,
            "b.claim": self._claim,
            "b.release": self.breakers.release_probe,
            "b.verdict": self._verdict,
            "m.get": self.budgets.get,
            "m.add": self.budgets.add,
            "m.seed": self._seed,
        }

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)  # the workers run as the supervisor's user; nobody else may touch the limits

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.counters.timer is not None:
            self.counters.timer.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                call_id, op, *args = orjson.loads(await reader.readexactly(size))
                try:
                    reply = [call_id, True, await self._ops[op](*args)]
                except Exception as exc:  # one bad call answers an error; the connection goes on
                    reply = [call_id, False, f"{type(exc).__name__}: {exc}"]
                body = orjson.dumps(reply)
                writer.write(_HEADER.pack(len(body)) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _read(self, name: str) -> list[Any]:
        return _state(await self.breakers.read(name))

    async def _trip(self, name: str, token: str, open_s: float) -> list[Any]:
        return _state(await self.breakers.trip(name, token, open_s))

    async def _claim(self, name: str, limit: int, lease_s: float) -> list[Any]:
        claim, shared = await self.breakers.claim_probe(name, limit, lease_s)
        return [claim.value, *_state(shared)]

    async def _verdict(self, name: str, trip: str, verdict: list[Any]) -> list[Any]:
        return _state(await self.breakers.probe_verdict(name, trip, ProbeVerdict(*verdict)))

    async def _seed(self, key: str, value: int, expires_at: str, ttl_s: int) -> None:
        await self.budgets.seed(key, value, datetime.fromisoformat(expires_at), ttl_s)


class MachineStateError(Exception):
    """The supervisor's state cannot be reached, or refused the call."""


class MachineStateClient:
    """In a worker: one pipelined connection to the supervisor, made again after it breaks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._connecting = asyncio.Lock()

    async def call(self, op: str, *args: Any) -> Any:
        try:
            writer = self._writer if self._writer is not None else await self._connect()
            call_id = next(self._ids)
            future = asyncio.get_running_loop().create_future()
            self._pending[call_id] = future
            body = orjson.dumps([call_id, op, *args])
            writer.write(_HEADER.pack(len(body)) + body)
            try:
                ok, result = await asyncio.wait_for(future, CALL_TIMEOUT_S)
            finally:
                self._pending.pop(call_id, None)
        except (OSError, TimeoutError) as exc:
            raise MachineStateError(f"the supervisor's state at {self.path}: {exc!r}") from exc
        if not ok:
            raise MachineStateError(result)
        return result

    async def aclose(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None:
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                self._reading = asyncio.create_task(self._read(reader), name="machine-state")
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                call_id, ok, result = orjson.loads(await reader.readexactly(size))
                future = self._pending.get(call_id)
                if future is not None and not future.done():
                    future.set_result((ok, result))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:  # the connection is gone: its calls fail now, the next call connects again
            if self._writer is not None:
                self._writer.close()
            self._writer = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection to the supervisor closed"))


class _Shared:
    """Calls to the supervisor's state; a failure is raised as the error its caller already handles."""

    def __init__(self, client: MachineStateClient) -> None:
        self._client = client

    def _error(self, exc: MachineStateError) -> Exception:
        raise NotImplementedError

    async def _call(self, op: str, *args: Any) -> Any:
        try:
            return await self._client.call(op, *args)
        except MachineStateError as exc:
            raise self._error(exc) from exc


class SharedCounters(_Shared):
    """The rate limiter's storage (`incr`, `get` as in `limits`), kept by the supervisor."""

    def _error(self, exc: MachineStateError) -> Exception:
        return StorageError(exc)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return int(await self._call("incr", key, expiry, amount))

    async def get(self, key: str) -> int:
        return int(await self._call("get", key))


class SharedBreakerStore(_Shared):
    """`BreakerStore` kept by the supervisor: every worker's breakers of one deployment are one breaker."""

    def _error(self, exc: MachineStateError) -> Exception:
        return BreakerStoreError(str(exc))

    async def read(self, name: str) -> SharedState:
        return SharedState(*await self._call("b.read", name))

    async def trip(self, name: str, token: str, open_s: float) -> SharedState:
        return SharedState(*await self._call("b.trip", name, token, open_s))

    async def claim_probe(self, name: str, limit: int, lease_s: float) -> tuple[ProbeClaim, SharedState]:
        claim, trip, remaining = await self._call("b.claim", name, limit, lease_s)
        return ProbeClaim(claim), SharedState(trip, remaining)

    async def release_probe(self, name: str, trip: str) -> None:
        await self._call("b.release", name, trip)

    async def probe_verdict(self, name: str, trip: str, verdict: ProbeVerdict) -> SharedState:
        fields = [verdict.ok, verdict.close_after, verdict.reopen_after, verdict.reopen_token, verdict.open_s]
        return SharedState(*await self._call("b.verdict", name, trip, fields))


class SharedBudgetCounters(_Shared):
    """The budgets' spend counters kept by the supervisor (the `_Counters` of cost/budgets.py). Failures read
    as Redis failures, which the budget guard already handles (it lets spending through and says so)."""

    def _error(self, exc: MachineStateError) -> Exception:
        return RedisError(str(exc))

    async def get(self, keys: Sequence[str]) -> list[int | None]:
        return list(await self._call("m.get", list(keys)))

    async def add(self, keys: Sequence[str], amount: int) -> list[int | None]:
        return list(await self._call("m.add", list(keys), amount))

    async def seed(self, key: str, value: int, expires_at: datetime, ttl_s: int) -> None:
        await self._call("m.seed", key, value, expires_at.isoformat(), ttl_s)

    async def aclose(self) -> None:
        return None
