"""Two `strata serve` replicas on one PostgreSQL database: a deploy or reload made on one reaches the
other (through Redis at once, or by polling without it), each replica re-checks it against its own
configuration, and a run is only claimed by a replica that serves its model."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.databases import fresh_postgres
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LOOPBACK = {"allow_networks": ["127.0.0.0/8"]}
WAIT_S = 20.0  # bound on every wait for a replica to converge


def config(database_url: str, mock: MockBackend, *, workers: int, sync_interval_s: float, redis: bool,
           endpoints: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "models": [{"kind": "openai", "name": "llm", "base_url": mock.url}],
        "database_url": database_url,
        "redis_url": REDIS_URL if redis else None,
        "agents": [],
        "runs": {"workers": workers, "poll_s": 0.05, "lease_s": 3},
        "server": {"health_interval_s": 0.2, "drain_delay_s": 0, "shutdown_grace_s": 2},
        "deploy": {"endpoints": LOOPBACK if endpoints is None else endpoints, "sync_interval_s": sync_interval_s},
    }


@asynccontextmanager
async def replicas_of(tmp_path: Path, *configs: dict[str, Any]) -> AsyncIterator[list[StrataProcess]]:
    # Replicas sharing a database share its encryption key (Strata will not make one up).
    env = {"STRATA_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode()}
    servers = [StrataProcess(tmp_path / f"replica-{i}", c, env=env) for i, c in enumerate(configs)]
    try:
        await asyncio.gather(*(asyncio.to_thread(server.start) for server in servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


def deploy(server: StrataProcess, model: str, base_url: str) -> int:
    body = {"kind": "openai", "base_url": base_url}
    response = httpx.post(f"{server.url}/admin/models/{model}/deploy", json=body, headers=server.headers, timeout=30)
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


async def eventually(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        await asyncio.sleep(0.1)


def chat(server: StrataProcess, model: str) -> str | None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=server.headers, timeout=10)
    return response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None


def replicas(server: StrataProcess, model: str) -> dict[str, dict[str, Any]]:
    """Each replica's report of `model`, by its port, as `server` lists them."""
    data = httpx.get(f"{server.url}/admin/models", headers=server.headers, timeout=10).json()["data"]
    entry = next((m for m in data if m["model"] == model), {"replicas": []})
    return {r["replica"].rsplit(":", 1)[1]: r for r in entry["replicas"]}


def versions(server: StrataProcess, model: str, servers: list[StrataProcess]) -> list[int | None] | None:
    seen = replicas(server, model)
    wanted = [str(s.port) for s in servers]
    return [seen[port]["version"] for port in wanted] if all(p in seen for p in wanted) else None


def start_run(server: StrataProcess, agent: str, model: str) -> str:
    put = httpx.put(f"{server.url}/admin/agents/{agent}", json={"model": model}, headers=server.headers, timeout=10)
    assert put.status_code in (200, 201), put.text
    body = {"input": "hello", "mode": "background"}
    created = httpx.post(f"{server.url}/v1/agents/{agent}/runs", json=body, headers=server.headers, timeout=10)
    assert created.status_code in (200, 201, 202), created.text
    return str(created.json()["id"])


def run(server: StrataProcess, run_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/v1/runs/{run_id}", headers=server.headers, timeout=10).json())


async def test_a_new_model_deployed_on_one_replica_is_served_and_run_by_the_other(tmp_path: Path) -> None:
    async with fresh_postgres() as database_url:
        with MockBackend() as first, MockBackend() as mockm:
            mockm.default = Reply(content="from mockm")
            # Polling once a minute: only the Redis notification can make the other replica converge in time.
            # A works no runs: a run is done by B, or not at all.
            async with replicas_of(
                tmp_path,
                config(database_url, first, workers=0, sync_interval_s=60, redis=True),
                config(database_url, first, workers=4, sync_interval_s=60, redis=True),
            ) as (a, b):
                version = deploy(a, "mockm", mockm.url)
                assert await eventually(lambda: chat(b, "mockm") == "from mockm", "B serves mockm")
                run_id = start_run(a, "clerk", "mockm")
                done = await eventually(lambda: (r := run(a, run_id))["status"] in ("completed", "failed") and r,
                                        "the run ends")  # fmt: skip
                assert (done["status"], done["output"]) == ("completed", "from mockm"), done
                for server in (a, b):
                    listed = await eventually(lambda s=server: versions(s, "mockm", [a, b]), "both replicas listed")
                    assert listed == [version, version]
                    assert {r["state"] for r in replicas(server, "mockm").values()} == {"serving"}


async def test_without_redis_replicas_converge_by_polling_on_deploys_and_reloads(tmp_path: Path) -> None:
    async with fresh_postgres() as database_url:
        with MockBackend() as first, MockBackend() as second:
            first.default, second.default = Reply(content="first"), Reply(content="second")
            async with replicas_of(
                tmp_path,
                config(database_url, first, workers=2, sync_interval_s=0.5, redis=False),
                config(database_url, first, workers=2, sync_interval_s=0.5, redis=False),
            ) as (a, b):
                assert deploy(a, "llm", second.url) == 2
                assert await eventually(lambda: chat(b, "llm") == "second", "B serves the new version of llm")
                assert await eventually(lambda: versions(b, "llm", [a, b]) == [2, 2], "B lists both at v2")

                # A reload on A: each replica re-reads its own file (both now add a model).
                for server in (a, b):
                    edited = yaml.safe_load(server.config_path.read_text())
                    edited["models"].append({"kind": "openai", "name": "extra", "base_url": second.url})
                    server.config_path.write_text(yaml.safe_dump(edited))
                reloaded = httpx.post(f"{a.url}/admin/reload", headers=a.headers, timeout=30)
                assert reloaded.status_code == 200, reloaded.text
                assert sorted(reloaded.json()["deployed"]) == ["extra", "llm"]  # llm: back to the file's version
                assert await eventually(lambda: chat(b, "extra") == "second", "B serves the model the reload added")
                assert await eventually(lambda: chat(b, "llm") == "first", "B serves the file's llm again")
                assert await eventually(lambda: versions(a, "llm", [a, b]) == [3, 3], "A lists both at v3")


async def test_a_replica_whose_config_refuses_a_version_keeps_off_its_runs(tmp_path: Path) -> None:
    async with fresh_postgres() as database_url:
        with MockBackend() as first, MockBackend() as mockm:
            async with replicas_of(
                tmp_path,
                config(database_url, first, workers=0, sync_interval_s=0.5, redis=False),
                # B's rules allow no endpoint on loopback: it must refuse what A accepted.
                config(database_url, first, workers=4, sync_interval_s=0.5, redis=False, endpoints={}),
            ) as (a, b):
                deploy(a, "mockm", mockm.url)
                refused = await eventually(lambda: replicas(a, "mockm").get(str(b.port)), "B reports on mockm")
                assert (refused["state"], refused["version"]) == ("refused", None)
                assert "loopback" in refused["note"]
                assert chat(b, "mockm") is None
                run_id = start_run(a, "clerk", "mockm")
                # B polls for runs every 50 ms: had it taken this one, it would have failed it long since.
                await asyncio.sleep(2)
                assert run(a, run_id)["status"] == "queued"
                assert mockm.chat_requests() == []
