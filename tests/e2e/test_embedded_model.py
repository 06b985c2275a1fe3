"""The real embedded model: SmolLM2-135M on llama.cpp, launched and supervised by `strata serve`."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from strata.serving.embedded import EMBEDDING_SERVER_MODULE, SERVER_MODULE
from tests.support.strata_process import StrataProcess

pytestmark = pytest.mark.e2e

CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    """`strata serve` with no models configured: the embedded default."""
    workdir = tmp_path_factory.mktemp("embedded")
    process = StrataProcess(workdir, {"server": {"drain_delay_s": 0}}).start(timeout_s=180)
    yield process
    process.stop()


@pytest.fixture
def client(embedded: StrataProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key=embedded.api_key, max_retries=0, timeout=120)


def test_short_completion_has_text_and_usage(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert result.choices[0].message.content.strip()
    assert result.usage.prompt_tokens > 5
    assert 0 < result.usage.completion_tokens <= 24
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streamed_completion_counts_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    # llama.cpp reports no usage in streams, so Strata counted with the model's own tokenizer.
    assert 0 < usage.completion_tokens <= 16
    assert usage.prompt_tokens > 5


def test_tool_call_constrained_by_json_schema_parses(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What's the weather like in Paris, in celsius?"}],
        tools=[CITY_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0,
    )
    call = result.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)
    assert arguments["unit"] in ("celsius", "fahrenheit")


def test_json_schema_response_format_is_honoured(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    result = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is 2 + 2? Answer in JSON."}],
        response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-item]
        max_tokens=32,
        temperature=0,
    )
    assert isinstance(json.loads(result.choices[0].message.content)["answer"], int)


def test_the_model_server_is_private_to_strata(embedded: StrataProcess) -> None:
    [child] = embedded.children(SERVER_MODULE)
    config_file = next((embedded.workdir / "strata-data" / "run").glob("*.llama.json"))
    config = json.loads(config_file.read_text())
    assert config["host"] == "127.0.0.1"
    port = config["port"]
    # Without Strata's per-launch token the model server refuses to answer.
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
    assert config["api_key"].encode() not in cmdline  # the token is not visible in `ps`


def _state(process: StrataProcess, model: str) -> str:
    return str(httpx.get(process.url + "/readyz").json()["models"][model])


def test_a_killed_model_server_is_restarted(embedded: StrataProcess, client: openai.OpenAI) -> None:
    [child] = embedded.children(SERVER_MODULE)
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _state(embedded, "smollm2-135m") == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    embedded.wait_for_models(timeout_s=120)  # /readyz stays 200 meanwhile: the embedding model is up
    [new_child] = embedded.children(SERVER_MODULE)
    assert new_child != child
    result = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert result.usage.completion_tokens > 0
    assert "child exited; restarting" in embedded.logs()


def test_shutdown_stops_the_model_server(tmp_path: Path) -> None:
    strata = StrataProcess(tmp_path, {"server": {"drain_delay_s": 0}}).start(timeout_s=180)
    children = _model_servers(strata)
    assert strata.stop() == 0
    assert not [child for child in children if Path(f"/proc/{child}").exists()]


def test_model_server_dies_with_a_killed_strata(tmp_path: Path) -> None:
    strata = StrataProcess(tmp_path, {}).start(timeout_s=180)
    children = _model_servers(strata)
    assert strata.process is not None
    strata.process.kill()
    strata.process.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in children if Path(f"/proc/{c}").exists()], "a model server outlived a kill -9 of strata"


def _model_servers(strata: StrataProcess) -> list[int]:
    """The chat model's server and the embedding model's (the default config runs both)."""
    [chat] = strata.children(SERVER_MODULE)
    [embeddings] = strata.children(EMBEDDING_SERVER_MODULE)
    return [chat, embeddings]


def test_an_agent_run_on_the_embedded_model_calls_a_tool(embedded: StrataProcess) -> None:
    spec = {
        "model": "smollm2-135m",
        "system_prompt": "You are a calculator assistant. Always use the calculator tool for arithmetic.",
        "tools": ["calculator"],
        "temperature": 0,
        "max_tokens_per_step": 64,
        "limits": {"max_steps": 2, "timeout_s": 120},
    }
    assert httpx.put(f"{embedded.url}/admin/agents/calc", json=spec, headers=embedded.headers).status_code in (200, 201)
    run = httpx.post(
        f"{embedded.url}/v1/agents/calc/runs", json={"input": "What is 12*7?"}, headers=embedded.headers, timeout=180
    ).json()
    assert run["status"] in ("completed", "failed"), run
    tool_steps = [s for s in run["steps"] if s["kind"] == "tool"]
    assert tool_steps, f"the model called no tool: {run}"
    first = tool_steps[0]
    assert first["name"] == "calculator"
    assert isinstance(json.loads(first["input"]["arguments"]), dict)  # a grammar-constrained, parseable call
    assert first["output"]["content"] == "84"
    # The result went back to the model: a model step followed the tool step.
    kinds = [s["kind"] for s in run["steps"]]
    assert kinds[:3] == ["model", "tool", "model"]


def test_the_shipped_demo_agent_answers_the_readme_questions(embedded: StrataProcess) -> None:
    """The README's demo questions on the embedded model: the clock is called with one zone, the arithmetic
    goes to the calculator (not the clock), the answer is plain text (no `&#34;` from an HTML-escaped prompt),
    and each model step costs something (CPU time)."""
    runs = []
    for question in ("What time is it?", "What time is it in UTC?", "What is 12*7?"):
        response = httpx.post(
            f"{embedded.url}/v1/agents/demo/runs", json={"input": question}, headers=embedded.headers, timeout=180
        )
        assert response.status_code == 200, response.text
        run = response.json()
        assert run["status"] == "completed", run
        assert "&#" not in json.dumps(run), run  # nothing the model read or wrote was HTML-escaped
        runs.append(run)
    for run in runs[:2]:  # the clock questions
        (tool,) = [s for s in run["steps"] if s["kind"] == "tool"]
        assert tool["name"] == "current_time" and tool["status"] == "completed", run
        zone = json.loads(tool["input"]["arguments"]).get("timezone", "UTC")
        assert "," not in zone and " " not in zone, zone  # one IANA name, as its schema's pattern allows
        assert run["output"].strip(), run
        assert run["cost_usd"] > 0, run  # the embedded model's CPU time, priced like a chat call's
    (tool,) = [s for s in runs[2]["steps"] if s["kind"] == "tool"]  # the arithmetic question: the calculator
    assert tool["name"] == "calculator" and tool["output"]["content"] == "84", runs[2]
    assert "84" in runs[2]["output"], runs[2]
    deadline = time.monotonic() + 15  # usage rows are written in batches, every second
    while True:
        usage = httpx.get(
            f"{embedded.url}/v1/usage", params={"group_by": "agent", "kind": "run_step"}, headers=embedded.headers
        ).json()
        demo = [r for r in usage["data"] if r["group"] == "demo"]
        if (demo and demo[0]["requests"] >= 6) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert demo and demo[0]["requests"] >= 6 and demo[0]["cost_usd"] > 0, usage  # two model steps a run


def test_a_small_loadtest_of_the_embedded_model_is_consistent(embedded: StrataProcess) -> None:
    """`strata loadtest` against the real model, in small bounds: every number in the report agrees with the
    others (the model's speed is the machine's, so no number is asserted against a target)."""
    import subprocess
    import sys
    from datetime import UTC, datetime

    began = datetime.now(UTC).isoformat()
    result = subprocess.run(
        [sys.executable, "-m", "strata", "loadtest", "--url", embedded.base_url, "--api-key", embedded.api_key,
         "--model", "smollm2-135m", "--concurrency", "1,2", "--duration", "4", "--max-requests", "4",
         "--prompt-tokens", "24", "--max-tokens", "12", "--timeout", "60", "--json"],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "smollm2-135m" and [s["load"] for s in report["steps"]] == [1, 2]
    assert report["best"] == 2  # no SLOs given: every step without errors counts
    for step in report["steps"]:
        assert step["errors"] == 0 and 1 <= step["completed"] == step["sent"] <= 4
        e2e, ttft = step["latency"]["e2e_s"], step["latency"]["ttft_s"]
        assert 0 < ttft["percentiles"]["p50"] <= e2e["max"]
        assert step["output_tokens_per_s"] > 0
        assert step["output_tokens_per_s"] <= step["completed"] * 12 / step["wall_s"] + 1e-9  # max_tokens bounds it
    # Strata recorded every one of those calls: its profile of the window agrees with the loadtest's counts.
    sent = sum(step["sent"] for step in report["steps"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    for _ in range(50):
        seen = subprocess.run(
            [sys.executable, "-m", "strata", "profile", "--from", began, "--model", "smollm2-135m", "--json",
             "--config", str(embedded.config_path)],
            cwd=embedded.workdir, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert seen.returncode == 0, seen.stderr
        profiled = json.loads(seen.stdout)
        if profiled["calls"] == sent:
            break
        time.sleep(0.2)
    assert profiled["calls"] == sent and profiled["errors"] == 0
    assert profiled["tokens"]["completion"]["max"] <= 12
    assert profiled["traffic"]["peak_concurrency"] <= 2  # never more clients than the loadtest ran
