"""Start-up, readiness and shutdown of a real `strata serve` process."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import StrataProcess


def test_readyz_waits_for_a_healthy_backend(tmp_path: Path) -> None:
    with MockBackend() as mock:
        mock.stop()  # nothing listens yet at the configured address
        config = {
            "models": [{"kind": "openai", "name": "m", "base_url": mock.url}],
            "server": {"health_interval_s": 0.2},
        }
        strata = StrataProcess(tmp_path, config).start(wait_ready=False)
        try:
            assert httpx.get(strata.url + "/healthz").status_code == 200
            not_ready = httpx.get(strata.url + "/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["reason"] == "no backend is healthy yet"
            revived = MockBackend(port=mock.port).start()
            try:
                strata.wait_for("/readyz", timeout_s=10)
                assert httpx.get(strata.url + "/readyz").json()["models"] == {"m": "healthy"}
            finally:
                revived.stop()
        finally:
            strata.stop()


def test_sigterm_drains_then_finishes_in_flight_streams(tmp_path: Path) -> None:
    with MockBackend() as mock:
        mock.default = Reply(content=" ".join(f"w{i}" for i in range(20)), chunk_delay_s=0.1)
        config = {
            "models": [{"kind": "openai", "name": "m", "base_url": mock.url}],
            "server": {"health_interval_s": 0.2, "drain_delay_s": 1.0, "shutdown_grace_s": 10},
        }
        strata = StrataProcess(tmp_path, config).start()
        received: list[bytes] = []

        def consume() -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True}
            url = strata.base_url + "/chat/completions"
            with httpx.stream("POST", url, json=body, headers=strata.headers, timeout=30) as response:
                received.extend(response.iter_bytes())

        reader = threading.Thread(target=consume)
        reader.start()
        while not received:
            time.sleep(0.02)
        strata.signal(signal.SIGTERM)
        time.sleep(0.3)
        draining = httpx.get(strata.url + "/readyz")
        assert (draining.status_code, draining.json()["status"]) == (503, "draining")
        reader.join(30)
        assert strata.process is not None
        assert strata.process.wait(30) == 0
        raw = b"".join(received)
        assert raw.endswith(b"data: [DONE]\n\n"), "the in-flight stream finished despite the shutdown"
        assert raw.count(b'"content":"w') == 20


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "strata.yaml"
    config.write_text("server:\n  port: 99999\n")
    result = subprocess.run(
        [sys.executable, "-m", "strata", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{config}:2: server.port: Input should be less than or equal to 65535 (got 99999)" in result.stderr


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, to reach Strata as another host would."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # no packet is sent; this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_admin_routes_answer_any_host_by_role(tmp_path: Path) -> None:
    outside = _outside_address()
    assert outside, "this test needs a non-loopback interface"
    with MockBackend() as mock:
        config = {
            "models": [{"kind": "openai", "name": "m", "base_url": mock.url}],
            "agents": [],
            "server": {"host": "0.0.0.0", "health_interval_s": 0.2},
        }
        strata = StrataProcess(tmp_path, config).start()
        try:
            remote = f"http://{outside}:{strata.port}"
            user = {"Authorization": f"Bearer {strata.create_key('user')}"}
            operator = {"Authorization": f"Bearer {strata.create_key('operator')}"}
            anonymous = httpx.get(f"{remote}/admin/deployments")
            assert anonymous.status_code == 401
            assert anonymous.json()["error"]["type"] == "authentication_error"
            refused = httpx.get(f"{remote}/admin/deployments", headers=user)
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "forbidden"
            deploy = httpx.post(
                f"{remote}/admin/models/m/deploy",
                json={"kind": "vllm", "model": "x", "executable": "/bin/sh"},
                headers=user,
            )
            assert deploy.status_code == 403
            assert httpx.post(f"{remote}/admin/reload", headers=user).status_code == 403
            # The role decides, not the address: an operator's key works from another host as from loopback.
            deployments = httpx.get(f"{remote}/admin/deployments", headers=operator)
            assert deployments.status_code == 200
            assert [d["model"] for d in deployments.json()["data"]] == ["m"]
            assert httpx.get(f"{strata.url}/admin/deployments", headers=operator).status_code == 200
            reloaded = httpx.post(f"{remote}/admin/reload", headers=operator, timeout=30)
            assert reloaded.status_code == 200, reloaded.text
            assert httpx.get(f"{remote}/metrics", headers=operator).status_code == 200  # Prometheus, from elsewhere
            assert httpx.get(f"{remote}/metrics").status_code == 401
            assert httpx.get(f"{remote}/healthz").status_code == 200
        finally:
            strata.stop()
