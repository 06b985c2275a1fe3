"""The vLLM launcher, with a stand-in `vllm` executable (no GPU here): the planned arguments, GPUs and
a private token reach it, Strata supervises it like the embedded model, and serves through it."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from tests.support.strata_process import REPO_ROOT, StrataProcess


def fake_vllm(tmp_path: Path) -> Path:
    script = tmp_path / "vllm"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={REPO_ROOT} exec {sys.executable} -m tests.support.fake_vllm "$@"\n')
    script.chmod(0o755)
    return script


def test_vllm_is_launched_with_the_plan_and_supervised(tmp_path: Path) -> None:
    record = tmp_path / "launches.jsonl"
    model = {
        "kind": "vllm",
        "name": "llama-8b",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "executable": str(fake_vllm(tmp_path)),
        "gpus": [0, 1],
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 8192,
        "kv_cache_dtype": "fp8",
        "extra_args": ["--enable-prefix-caching"],
        "env": {"FAKE_VLLM_RECORD": str(record), "HF_HOME": "/models/hf"},
        "startup_timeout_s": 60,
        "restart_backoff_max_s": 1,
    }
    strata = StrataProcess(tmp_path, {"models": [model], "agents": []}).start(timeout_s=60)
    try:
        reply = httpx.post(
            f"{strata.base_url}/chat/completions",
            json={"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]},
            headers=strata.headers,
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "meta-llama/Llama-3.1-8B-Instruct says hi"

        launch = json.loads(record.read_text().splitlines()[0])
        argv = launch["argv"]
        assert argv[:2] == ["serve", "meta-llama/Llama-3.1-8B-Instruct"]
        for flag, value in [
            ("--host", "127.0.0.1"),
            ("--served-model-name", "llama-8b"),
            ("--tensor-parallel-size", "2"),
            ("--gpu-memory-utilization", "0.85"),
            ("--max-model-len", "8192"),
            ("--kv-cache-dtype", "fp8"),
        ]:
            assert argv[argv.index(flag) + 1] == value
        assert "--enable-prefix-caching" in argv
        assert launch["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert launch["env"]["HF_HOME"] == "/models/hf"
        token = launch["env"]["VLLM_API_KEY"]
        assert token and token not in " ".join(argv), "the token is never on the command line"
        port = int(argv[argv.index("--port") + 1])
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # private to Strata

        deadline = time.monotonic() + 10  # vLLM's own metrics appear in Strata's, per deployment
        while "vllm:gpu_cache_usage_perc" not in httpx.get(f"{strata.url}/metrics", headers=strata.headers).text:
            assert time.monotonic() < deadline, "vLLM's metrics never reached Strata's /metrics"
            time.sleep(0.2)
        exported = httpx.get(f"{strata.url}/metrics", headers=strata.headers).text
        assert 'vllm:gpu_cache_usage_perc{deployment="llama-8b/vllm",model_name="llama-8b"} 0.25' in exported

        [child] = strata.children("fake_vllm")
        os.killpg(os.getpgid(child), signal.SIGKILL)  # the server crashes (the sh wrapper execs python)
        deadline = time.monotonic() + 30
        while len(record.read_text().splitlines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        strata.wait_for("/readyz", timeout_s=30)
        again = httpx.post(
            f"{strata.base_url}/chat/completions",
            json={"model": "llama-8b", "messages": [{"role": "user", "content": "still there?"}]},
            headers=strata.headers,
            timeout=10,
        )
        assert again.status_code == 200
        second = json.loads(record.read_text().splitlines()[1])
        assert second["env"]["VLLM_API_KEY"] != token, "every launch gets a fresh token"
        [new_child] = strata.children("fake_vllm")
    finally:
        assert strata.stop() == 0
    assert not Path(f"/proc/{new_child}").exists(), "stopping Strata stopped vLLM"
