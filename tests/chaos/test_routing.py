"""Where requests go: weights, health, and route rules by agent, tag and prompt size."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.chaos.test_resilience import fire, serve
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess


async def test_weights_share_the_traffic(tmp_path: Path) -> None:
    with MockBackend() as heavy, MockBackend() as light:
        model = {
            "kind": "openai",
            "name": "llm",
            "deployments": [{"base_url": heavy.url, "weight": 3}, {"base_url": light.url, "weight": 1}],
        }
        strata = serve(tmp_path, [model])
        try:
            responses = await fire(strata, 400, 1)
            assert {r.status_code for r in responses} == {200}
            share = heavy.chat_attempts / 400
            assert 0.65 < share < 0.85, share  # about 3/4
        finally:
            strata.stop()


async def test_a_replica_that_goes_down_stops_getting_traffic_and_comes_back(tmp_path: Path) -> None:
    with MockBackend() as steady:
        flaky = MockBackend().start()
        model = {"kind": "openai", "name": "llm", "deployments": [{"base_url": steady.url}, {"base_url": flaky.url}]}
        strata = serve(tmp_path, [model])
        try:
            port = flaky.port
            flaky.stop()  # gone: connections refused; the health probe notices
            deadline = time.monotonic() + 10
            while _healthy(strata)[flaky.url] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not _healthy(strata)[flaky.url]
            before = steady.chat_attempts
            responses = await fire(strata, 40, 4)
            assert {r.status_code for r in responses} == {200}
            assert steady.chat_attempts - before == 40, "no request was even tried on the dead replica"
            revived = MockBackend(port=port).start()
            try:
                deadline = time.monotonic() + 10
                while not _healthy(strata)[flaky.url] and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await fire(strata, 40, 4)
                assert revived.chat_attempts > 0, "the recovered replica gets traffic again"
            finally:
                revived.stop()
        finally:
            strata.stop()


async def test_route_rules_pick_a_model_by_agent_tag_and_prompt_size(tmp_path: Path) -> None:
    with MockBackend() as cpu, MockBackend() as gpu:
        cpu.default, gpu.default = Reply(content="cpu"), Reply(content="gpu")
        models = [
            {"kind": "openai", "name": "small", "base_url": cpu.url},
            {"kind": "openai", "name": "big", "base_url": gpu.url},
        ]
        routes = [
            {
                "name": "auto",
                "rules": [
                    {"model": "small", "tags": ["classify"]},
                    {"model": "small", "agents": ["router-agent"]},
                    {"model": "small", "max_prompt_tokens": 50},
                    {"model": "big"},
                ],
            }
        ]
        agents = [{"name": "router-agent", "model": "auto"}]
        strata = serve(tmp_path, models, {"routes": routes, "agents": agents})
        try:

            def ask(text: str, **extra: object) -> str:
                headers = {**strata.headers, **extra.pop("headers", {})}
                body = {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}
                reply = httpx.post(f"{strata.base_url}/chat/completions", json=body, headers=headers, timeout=10)
                assert reply.status_code == 200, reply.text
                return reply.json()["choices"][0]["message"]["content"]

            long_text = "word " * 400
            assert ask("short question") == "cpu"  # a small prompt goes to the CPU model
            assert ask(long_text) == "gpu"  # a long one to the GPU model
            assert ask(long_text, headers={"X-Strata-Tag": "classify"}) == "cpu"  # tagged by header
            assert ask(long_text, metadata={"tag": "classify"}) == "cpu"  # or in the body
            run = httpx.post(
                f"{strata.url}/v1/agents/router-agent/runs",
                json={"input": long_text},
                headers=strata.headers,
                timeout=30,
            ).json()
            assert run["output"] == "cpu"  # the agent's rule wins over the prompt size
            models_listed = [
                m["id"] for m in httpx.get(f"{strata.base_url}/models", headers=strata.headers).json()["data"]
            ]
            assert models_listed == ["small", "big", "auto"]
        finally:
            strata.stop()


def _healthy(strata: StrataProcess) -> dict[str, bool]:
    data = httpx.get(f"{strata.url}/admin/deployments", headers=strata.headers).json()["data"]
    return {d["target"]: d["healthy"] for d in data}
