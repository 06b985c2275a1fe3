"""`strata profile` on real traffic: a real `strata serve` in front of the mock backend, a known sequence of
chat requests (sequential, four at once, streamed) and an agent run, then the profile the CLI reads from the
same database, checked against what was sent."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply
from tests.support.strata_process import REPO_ROOT, StrataProcess

PRICE = (3.0, 15.0)  # USD per million prompt / completion tokens
SEQUENTIAL = [(120, 7), (40, 3), (900, 31), (64, 12), (310, 20)]
AT_ONCE = (50, 9)  # four requests of these tokens, held 0.6 s each by the mock, in flight together
STREAMED = (25, 3)


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [
            mock_model(mock_backend, "profiled", input_usd_per_mtok=PRICE[0], output_usd_per_mtok=PRICE[1]),
            mock_model(mock_backend, "other"),
        ],
        "agents": [{"name": "profiler", "model": "profiled"}],
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    process = StrataProcess(tmp_path_factory.mktemp("profile"), config, {"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0


def cli(server: StrataProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")} | {
        "PYTHONPATH": str(REPO_ROOT),
        "MOCK_API_KEY": "mock-secret",
    }
    return subprocess.run(
        [sys.executable, "-m", "strata", "profile", *args, "--config", str(server.config_path)],
        cwd=server.workdir, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def cost(prompt: int, completion: int) -> float:
    return (prompt * PRICE[0] + completion * PRICE[1]) * 1e-6


def chat(model: str = "profiled", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def rank(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def test_the_profile_adds_up_to_the_requests_sent(
    server: StrataProcess, mock_backend: MockBackend, tmp_path: Path
) -> None:
    client = server.client()
    for prompt, completion in SEQUENTIAL:
        mock_backend.script(Reply(prompt_tokens=prompt, completion_tokens=completion))
        assert client.post("/v1/chat/completions", json=chat(), timeout=30).status_code == 200
    mock_backend.default = Reply(prompt_tokens=AT_ONCE[0], completion_tokens=AT_ONCE[1], latency_s=0.6)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/chat/completions", json=chat(), timeout=30), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    mock_backend.default = Reply()
    mock_backend.script(Reply(content="one two three", prompt_tokens=STREAMED[0], completion_tokens=STREAMED[1]))
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True), timeout=30) as streamed:
        assert streamed.status_code == 200
        streamed.read()
    assert client.post("/v1/chat/completions", json=chat("other"), timeout=30).status_code == 200  # filtered out
    mock_backend.script(Reply(prompt_tokens=33, completion_tokens=4))
    run = client.post("/v1/agents/profiler/runs", json={"input": "hi"}, timeout=30)
    assert run.status_code == 200 and run.json()["status"] == "completed", run.text

    sent = [*SEQUENTIAL, *[AT_ONCE] * 4, STREAMED, (33, 4)]
    html = tmp_path / "profile.html"
    for _ in range(50):  # usage rows are written in batches, off the request path
        result = cli(server, "--json", "--model", "profiled", "--slo-e2e-p95-s", "30", "--slo-ttft-ms", "0.001",
                     "--html", str(html))  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = orjson.loads(result.stdout)
        if report["calls"] == len(sent):
            break
    assert report["calls"] == len(sent) and report["errors"] == 0
    prompts, completions = [p for p, _ in sent], [c for _, c in sent]
    tokens = report["tokens"]
    for name, values in (("prompt", prompts), ("completion", completions)):
        assert tokens[name]["percentiles"] == {f"p{p}": rank(values, p) for p in (50, 90, 99)}
        assert tokens[name]["max"] == max(values) and tokens[name]["count"] == len(sent)
    assert report["traffic"]["peak_concurrency"] == 4  # the four held by the mock overlapped, nothing else did
    assert report["spend"]["total_usd"] == pytest.approx(sum(cost(p, c) for p, c in sent), abs=1e-9)
    assert list(report["spend"]["by_model"]) == ["profiled"]
    assert report["runs"]["runs"] == 1 and report["runs"]["steps"]["max"] == 1
    assert report["by_agent"]["profiler"]["calls"] == 1
    assert report["latency"]["ttft_s"]["count"] == 1  # only the streamed call has a first token
    ttft, e2e = sorted(report["slos"], key=lambda slo: slo["label"])
    assert (e2e["label"], e2e["met"]) == ("end-to-end p95", True)
    assert (ttft["label"], ttft["met"]) == ("TTFT p50", False)
    assert "<svg" in html.read_text()

    text = cli(server, "--model", "profiled", "--slo-e2e-p95-s", "30")
    assert text.returncode == 0, text.stderr
    assert f"{len(sent)} calls" in text.stdout and "met" in text.stdout


def test_a_request_log_is_profiled_and_bad_options_are_named(server: StrataProcess, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    lines = [
        {"request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
         "response": {"usage": {"prompt_tokens": p, "completion_tokens": c}},
         "timestamp": f"2026-12-01T09:00:{i:02d}Z", "latency_s": 2.0}
        for i, (p, c) in enumerate(SEQUENTIAL)
    ]  # fmt: skip
    log.write_bytes(b"\n".join(orjson.dumps(line) for line in lines))
    result = cli(server, "--file", str(log), "--json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["calls"] == len(SEQUENTIAL)
    assert report["tokens"]["prompt"]["max"] == 900
    assert report["traffic"]["peak_concurrency"] == 2  # one a second, two seconds each

    log.write_text('{"messages": []}\n{"oops"\n')
    bad = cli(server, "--file", str(log))
    assert bad.returncode == 2 and "line 2: not JSON" in bad.stderr
    for args, message in (
        (("--slo-e2e-p95-s", "0"), "--slo-e2e-p95-s: must be more than 0"),
        (("--kind", "batch"), "--kind: must be chat or run_step"),
        (("--from", "last week"), "--from: 'last week' is not an ISO date"),
        (("--file", str(log), "--model", "x"), "--file profiles the whole log"),
    ):
        refused = cli(server, *args)
        assert refused.returncode == 2, args
        assert message in refused.stderr, refused.stderr
