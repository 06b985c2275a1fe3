"""Hot swap under load: a model moves to new deployments while 50 streams run on the old ones."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import yaml

from tests.chaos.test_resilience import BODY, fire, serve
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess

# The mock backends listen on loopback: models deployed over the API may point there only when allowed.
LOOPBACK_DEPLOYS = {"deploy": {"endpoints": {"allow_networks": ["127.0.0.0/8"]}}}


def models_view(strata: StrataProcess) -> dict[str, dict]:
    return {m["model"]: m for m in httpx.get(f"{strata.url}/admin/models", headers=strata.headers).json()["data"]}


async def test_hot_swap_under_50_streams_fails_nothing(tmp_path: Path) -> None:
    with MockBackend() as old, MockBackend() as new:
        old.default = Reply(content=" ".join(["old"] * 30), chunk_delay_s=0.05)
        new.default = Reply(content="new version")
        strata = serve(
            tmp_path, [{"kind": "openai", "name": "llm", "base_url": old.url}], LOOPBACK_DEPLOYS, shutdown_grace_s=20
        )
        try:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=60, limits=limits, headers=strata.headers) as client:

                async def stream() -> bytes:
                    body = {**BODY, "stream": True}
                    async with client.stream("POST", f"{strata.base_url}/chat/completions", json=body) as response:
                        assert response.status_code == 200
                        return b"".join([chunk async for chunk in response.aiter_bytes()])

                streams = [asyncio.create_task(stream()) for _ in range(50)]
                while old.in_flight < 50:
                    await asyncio.sleep(0.02)
                deployed = await client.post(
                    f"{strata.url}/admin/models/llm/deploy", json={"kind": "openai", "base_url": new.url}
                )
                assert deployed.status_code == 200, deployed.text
                assert deployed.json()["version"] == 2
                after = await fire(strata, 10, 5)
                results = await asyncio.gather(*streams)
            assert all(r.endswith(b"data: [DONE]\n\n") and r.count(b'"content":"old') == 30 for r in results)
            assert [r.json()["choices"][0]["message"]["content"] for r in after] == ["new version"] * 10
            assert old.chat_attempts == 50 and new.chat_attempts == 10
            deadline = time.monotonic() + 10
            while models_view(strata)["llm"]["versions"][0]["state"] != "stopped" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            view = models_view(strata)["llm"]
            assert (view["version"], view["state"]) == (2, "serving")
            assert [v["state"] for v in view["versions"]] == ["stopped", "serving"]
        finally:
            strata.stop()


async def test_a_version_that_never_gets_healthy_is_rolled_back(tmp_path: Path) -> None:
    with MockBackend() as current:
        current.default = Reply(content="still here")
        strata = serve(tmp_path, [{"kind": "openai", "name": "llm", "base_url": current.url}], LOOPBACK_DEPLOYS)
        try:
            response = httpx.post(
                f"{strata.url}/admin/models/llm/deploy?health_timeout_s=1",
                json={"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
                headers=strata.headers,
                timeout=30,
            )
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "deploy_failed"
            assert "rolled back" in response.json()["error"]["message"]
            assert [r.json()["choices"][0]["message"]["content"] for r in await fire(strata, 5, 5)] == [
                "still here"
            ] * 5
            view = models_view(strata)["llm"]
            assert view["version"] == 1
            assert [v["state"] for v in view["versions"]] == ["serving", "failed"]
            bad = httpx.post(
                f"{strata.url}/admin/models/llm/deploy",
                json={"kind": "openai", "base_url": "ftp://x"},
                headers=strata.headers,
            )
            assert (bad.status_code, bad.json()["error"]["param"]) == (400, "base_url")
        finally:
            strata.stop()


async def test_sighup_reloads_changed_models_by_hot_swap(tmp_path: Path) -> None:
    with MockBackend() as first, MockBackend() as second:
        first.default, second.default = Reply(content="first"), Reply(content="second")
        strata = serve(tmp_path, [{"kind": "openai", "name": "llm", "base_url": first.url}])
        try:
            config = yaml.safe_load(strata.config_path.read_text())
            config["models"] = [
                {"kind": "openai", "name": "llm", "base_url": second.url},
                {"kind": "openai", "name": "extra", "base_url": first.url},
            ]
            strata.config_path.write_text(yaml.safe_dump(config))
            strata.signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while models_view(strata).get("llm", {}).get("version") != 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert models_view(strata)["llm"]["version"] == 2
            assert [r.json()["choices"][0]["message"]["content"] for r in await fire(strata, 3, 3)] == ["second"] * 3
            extra = await fire(strata, 1, 1, {**BODY, "model": "extra"})
            assert extra[0].json()["choices"][0]["message"]["content"] == "first"
            reloaded = httpx.post(f"{strata.url}/admin/reload", headers=strata.headers, timeout=30).json()
            assert reloaded["unchanged"] == ["llm", "extra"] and reloaded["deployed"] == []
        finally:
            strata.stop()


def test_strata_models_deploy_and_list_from_the_command_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    with MockBackend() as first, MockBackend() as second:
        second.default = Reply(content="via the CLI")
        strata = serve(tmp_path, [{"kind": "openai", "name": "llm", "base_url": first.url}], LOOPBACK_DEPLOYS)
        try:
            # An operator's key: deploying and listing models is an operator's job.
            env = {**os.environ, "STRATA_API_KEY": strata.create_key("operator")}
            spec = tmp_path / "llm-v2.yaml"
            spec.write_text(f"kind: openai\nbase_url: {second.url}\n")
            deploy = subprocess.run(
                [sys.executable, "-m", "strata", "models", "deploy", "llm", "-f", str(spec), "--url", strata.url],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert deploy.returncode == 0, deploy.stderr
            assert "llm v2 is serving" in deploy.stdout
            listing = subprocess.run(
                [sys.executable, "-m", "strata", "models", "list", "--url", strata.url],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert listing.returncode == 0 and "serving" in listing.stdout
            assert second.url.split("//")[1].split("/")[0] in listing.stdout
            spec.write_text("kind: openai\nbase_url: ftp://nowhere\n")
            refused = subprocess.run(
                [sys.executable, "-m", "strata", "models", "deploy", "llm", "-f", str(spec), "--url", strata.url],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert refused.returncode == 2  # USAGE: the server refused the spec as invalid
            assert "error 400" in refused.stderr and "base_url" in refused.stderr
        finally:
            strata.stop()
