"""The compute layer through the product: GPU inventory (CLI, admin API, metrics) and read_document
parsing in the CPU pool during an agent run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.strata_process import StrataProcess


def test_strata_gpus_answers_plainly_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "strata", "gpus", "--json"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    inventory = json.loads(result.stdout)
    human = subprocess.run([sys.executable, "-m", "strata", "gpus"], capture_output=True, text=True, timeout=60)
    assert human.returncode == 0
    if inventory["available"]:
        assert inventory["gpus"] and all(g["memory_total_bytes"] > 0 for g in inventory["gpus"])
    else:  # a machine without NVIDIA GPUs, like CI: said plainly, not as an error
        assert "NVML" in inventory["reason"]
        assert human.stdout.startswith("No NVIDIA GPUs found: ")


def test_gpus_and_documents_in_a_running_server(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.html").write_text(
        "<html><head><style>p{color:red}</style><script>alert(1)</script></head>"
        "<body><h1>Quarterly notes</h1><p>Revenue grew &amp; costs fell.</p></body></html>"
    )
    (tmp_path / "secret.txt").write_text("do not read me")
    with MockBackend(api_key="mock-secret") as mock:
        mock.script(
            Reply(tool_calls=[ToolCallSpec("read_document", {"path": str(docs / "notes.html")}, id="d1")]),
            Reply(tool_calls=[ToolCallSpec("read_document", {"path": str(tmp_path / "secret.txt")}, id="d2")]),
            Reply(content="summarised"),
        )
        config = {
            "models": [mock_model(mock)],
            "tools": {"read_document": {"allowed_dirs": [str(docs)]}},
            "agents": [{"name": "reader", "model": "mock-model", "tools": ["read_document"]}],
        }
        strata = StrataProcess(tmp_path / "strata", config, env={"MOCK_API_KEY": "mock-secret"}).start()
        try:
            gpus = httpx.get(f"{strata.url}/admin/gpus", headers=strata.headers).json()
            assert set(gpus) >= {"available", "reason", "gpus", "links"}
            if not gpus["available"]:
                assert (
                    "strata_gpu_memory_total_bytes{"
                    not in httpx.get(f"{strata.url}/metrics", headers=strata.headers).text
                )

            run = httpx.post(
                f"{strata.url}/v1/agents/reader/runs", json={"input": "summarise"}, headers=strata.headers, timeout=60
            ).json()
            assert run["status"] == "completed", run
            read, refused = (s["output"] for s in run["steps"] if s["kind"] == "tool")
            assert "Quarterly notes" in read["content"] and "Revenue grew & costs fell." in read["content"]
            assert "alert(1)" not in read["content"] and "color:red" not in read["content"]
            assert refused["is_error"] and "do not read me" not in refused["content"]
        finally:
            assert strata.stop() == 0
