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
            mock_model(mock_backend, "loaded"),
        ],
        "agents": [{"name": "profiler", "model": "profiled"}],
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 2},
    }
    process = StrataProcess(tmp_path_factory.mktemp("profile"), config, {"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0


def cli(server: StrataProcess, *args: str, command: str = "profile") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "MOCK_API_KEY": "mock-secret"}
    config = ["--config", str(server.config_path)] if command == "profile" else []
    return subprocess.run(
        [sys.executable, "-m", "strata", command, *args, *config],
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


def test_a_loadtest_through_strata_drawn_from_a_profile(
    server: StrataProcess, mock_backend: MockBackend, tmp_path: Path
) -> None:
    """A profile of a log feeds the loadtest's prompt and answer sizes; the loadtest's requests go through
    Strata to the mock, and Strata's own profile of them agrees with the loadtest's counts."""
    log = tmp_path / "requests.jsonl"
    log.write_bytes(b"\n".join(
        orjson.dumps({"request": {"messages": [{"role": "user", "content": "hi"}]},
                      "response": {"usage": {"prompt_tokens": p, "completion_tokens": c}}})
        for p, c in SEQUENTIAL
    ))  # fmt: skip
    sizes = tmp_path / "profile.json"
    sizes.write_text(cli(server, "--file", str(log), "--json").stdout)
    mock_backend.default = Reply(content="alpha beta gamma delta", latency_s=0.05, chunk_delay_s=0.01)
    chart = tmp_path / "loadtest.svg"
    args = ["--url", server.base_url, "--api-key", server.api_key, "--model", "loaded", "--concurrency", "1,3",
            "--duration", "2", "--max-requests", "12", "--profile", str(sizes), "--slo-ttft-p95-ms", "5000",
            "--chart", str(chart), "--json"]  # fmt: skip
    result = cli(server, *args, command="loadtest")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    steps = report["steps"]
    assert [s["load"] for s in steps] == [1, 3] and report["best"] == 3
    for step in steps:
        assert step["errors"] == 0 and 0 < step["sent"] <= 12 and step["completed"] == step["sent"]
        assert step["achieved_rps"] == pytest.approx(step["completed"] / step["wall_s"])
        assert step["latency"]["ttft_s"]["max"] <= step["latency"]["e2e_s"]["max"]
        assert step["latency"]["itl_s"]["count"] == 3 * step["completed"]  # four chunks: three gaps each
    requests = [r for r in mock_backend.requests if r.body and r.body.get("model") == "upstream-loaded"]
    assert len(requests) == sum(s["sent"] for s in steps)
    drawn = {r.body["max_tokens"] for r in requests if r.body}
    assert drawn <= set(range(1, 32)) and len(drawn) > 1  # from the profile's completion histogram (3..31)
    assert chart.read_text().lstrip().startswith("<?xml") and "<svg" in chart.read_text()

    for _ in range(50):
        seen = orjson.loads(cli(server, "--json", "--model", "loaded").stdout)
        if seen["calls"] == len(requests):
            break
    assert seen["calls"] == len(requests)
    assert seen["traffic"]["peak_concurrency"] == 3


def test_loadtest_refuses_bad_options_and_says_when_nothing_answers(server: StrataProcess) -> None:
    for args, message in (
        ((), "give exactly one of --rate"),
        (("--rate", "1", "--concurrency", "2"), "give exactly one of --rate"),
        (("--rate", "fast"), "--rate: 'fast' is not a comma-separated list"),
        (("--concurrency", "1.5"), "--concurrency: clients are whole numbers"),
        (("--rate", "0"), "--rate: every step must be more than 0"),
        (("--rate", "1", "--chart", "out.pdf"), "--chart: out.pdf must end in .svg or .png"),
        (("--rate", "1", "--profile", "/nonexistent.json"), "--profile: cannot read"),
    ):
        refused = cli(server, "--model", "loaded", *args, command="loadtest")
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.stderr, refused.stderr
    nobody = cli(server, "--model", "m", "--url", "http://127.0.0.1:9/v1", "--rate", "2,4", "--duration", "1",
                 "--timeout", "2", "--json", command="loadtest")  # fmt: skip
    assert nobody.returncode == 1
    report = orjson.loads(nobody.stdout)
    assert len(report["steps"]) == 1 and report["best"] is None  # the second step is not tried
    assert "ClientConnectorError" in report["steps"][0]["error_examples"][0]


def test_plan_section_agrees_with_strata_plan(server: StrataProcess, tmp_path: Path) -> None:
    """`--plan` sizes for the profile's peak concurrency and p99 lengths: the same answer `strata plan` gives for
    those numbers, on the GPU named, priced from the config; a loadtest report replaces the estimate."""
    log = tmp_path / "requests.jsonl"
    lines = [
        {"request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
         "response": {"usage": {"prompt_tokens": p, "completion_tokens": c}},
         "timestamp": f"2026-12-01T09:00:{i // 2:02d}Z", "latency_s": 0.5, "cost_usd": 0.01}
        for i, (p, c) in enumerate(SEQUENTIAL)
    ]  # fmt: skip
    log.write_bytes(b"\n".join(orjson.dumps(line) for line in lines))
    result = cli(server, "--file", str(log), "--plan", "llama-3.1-8b", "--gpu", "L4", "--json")
    assert result.returncode == 0, result.stderr
    sized = orjson.loads(result.stdout)["self_host"]
    context = 900 + 31  # p99 prompt + p99 completion of SEQUENTIAL
    direct = cli(server, "llama-3.1-8b", "--gpu-count", "1", "--gpu-memory-gib", "24", "--gpu-name", "L4",
                 "--concurrency", "2", "--max-context", str(context), "--json", command="plan")  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    plan = orjson.loads(direct.stdout)
    assert sized["plan"]["request"] == plan["request"]
    assert sized["tensor_parallel_size"] == plan["tensor_parallel_size"] == 1
    assert sized["vllm_command"] == plan["vllm_command"]
    assert sized["self_host_usd_per_month"] == pytest.approx(sized["replicas"] * 0.60 * 730)  # cost.gpu_prices L4
    assert {a["name"]: a["source"] for a in sized["assumptions"]}["L4 price"] == "cost.gpu_prices[L4]"

    loadtest = tmp_path / "loadtest.json"
    loadtest.write_bytes(orjson.dumps({"best": 4, "steps": [{"load": 4, "output_tokens_per_s": 123.0}]}))
    measured = orjson.loads(cli(server, "--file", str(log), "--plan", "llama-3.1-8b", "--gpu", "L4",
                                "--loadtest", str(loadtest), "--json").stdout)["self_host"]  # fmt: skip
    per_replica = {a["name"]: a for a in measured["assumptions"]}["output tokens/s per replica"]
    assert per_replica["value"] == 123.0 and "measured by strata loadtest" in per_replica["source"]
    text = cli(server, "--file", str(log), "--plan", "llama-3.1-8b", "--gpu", "L4")
    assert "break-even" in text.stdout and "vllm serve meta-llama/Llama-3.1-8B-Instruct" in text.stdout
    for args, message in (
        (("--gpu", "TPU"), "--gpu: no price for 'TPU' in cost.gpu_prices"),
        (("--plan", "no-such-model"), "--plan no-such-model:"),
        (("--api-input-usd-per-mtok", "1"), "go together"),
    ):
        plan_args = ["--plan", "llama-3.1-8b", *args] if args[0] != "--plan" else list(args)
        refused = cli(server, "--file", str(log), *plan_args)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
