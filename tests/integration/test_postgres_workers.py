"""Two `strata serve` processes on one PostgreSQL database share the run queue: every run is executed,
none twice, and both processes do some of the work."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import mock_model
from tests.support.databases import fresh_postgres
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess

RUNS = 24


async def test_two_servers_share_the_queue_without_double_execution(tmp_path: Path) -> None:
    effects = tmp_path / "effects.log"
    async with fresh_postgres() as database_url:
        with MockBackend(api_key="mock-secret") as mock:
            mock.default = Reply(
                tool_calls=[ToolCallSpec("record", {"label": "work"}, id="only")],
                answer_after_tool="done",
                latency_s=0.05,
            )
            config = {
                "models": [mock_model(mock)],
                "database_url": database_url,
                "tools": {"functions": [{"name": "record", "import_path": "tests.support.agent_tools:record_call"}]},
                "agents": [{"name": "clerk", "model": "mock-model", "tools": ["record"]}],
                "runs": {"lease_s": 3, "poll_s": 0.05, "workers": 4},
            }
            env = {
                "MOCK_API_KEY": "mock-secret",
                "TEST_SIDE_EFFECTS_LOG": str(effects),
                # Replicas sharing a database must share its encryption key (Strata will not make one up).
                "STRATA_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
            }
            servers = [StrataProcess(tmp_path / name, config, env=env) for name in ("a", "b")]
            await asyncio.gather(*(asyncio.to_thread(server.start) for server in servers))
            try:
                async with httpx.AsyncClient(timeout=30, headers=servers[0].headers) as client:
                    responses = await asyncio.gather(
                        *(
                            client.post(
                                f"{servers[i % 2].url}/v1/agents/clerk/runs",
                                json={"input": f"job {i}", "mode": "background"},
                            )
                            for i in range(RUNS)
                        )
                    )
                    run_ids = [r.json()["id"] for r in responses]
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        runs = [(await client.get(f"{servers[0].url}/v1/runs/{rid}")).json() for rid in run_ids]
                        if all(run["status"] == "completed" for run in runs):
                            break
                        await asyncio.sleep(0.2)
                assert [run["status"] for run in runs] == ["completed"] * RUNS
                keys = Counter(line.split()[0] for line in effects.read_text().splitlines())
                assert sorted(keys) == sorted(f"{rid}:0:only" for rid in run_ids)
                assert set(keys.values()) == {1}, "no tool call was executed twice"
                claims = [server.logs().count('"run claimed"') for server in servers]
                assert sum(claims) == RUNS and min(claims) > 0, f"both servers worked: {claims}"
            finally:
                for server in servers:
                    server.stop()
