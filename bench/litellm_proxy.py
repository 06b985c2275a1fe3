"""The LiteLLM proxy as a benchmark peer: its config, its extra packages, and its process.

LiteLLM runs with the production features Strata has on, as far as it allows without a database:
- authentication: a master key (`general_settings.master_key`). Virtual keys, and with them per-key rpm/tpm
  limits and spend tracking, need PostgreSQL through Prisma, whose CLI downloads its engine binaries from
  binaries.prisma.sh on first use: unreachable here (only package registries are), so no DB-backed features;
- rate limiting: per-deployment rpm/tpm (2^31-1, never refusing) enforced in memory by the router's
  `usage-based-routing-v2` strategy, which checks and counts every request (`x-ratelimit-*` headers prove it);
- metering: LiteLLM prices every response (`response_cost` in its logging payload), kept in memory only;
- metrics: the open-source `prometheus` callback, `/metrics/` on the proxy port;
- tracing: the `otel` callback, OTLP/HTTP (protobuf, batch span processor) to the bench's OTLP sink, every request;
- logging: JSON logs (`json_logs`), uvicorn's access log line per request at info level;
- anything that phones home is off: `LITELLM_TELEMETRY_DISABLED`, and the cost map, blog posts, beta headers,
  policy templates and router presets come from the package (`LITELLM_LOCAL_*`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.peers import peer_python, peer_version
from bench.servers import GENEROUS, MODEL, BenchServers, Process, cpu_seconds, free_port, wait_http

MASTER_KEY = "sk-bench-litellm-master-key"
UPSTREAM_KEY = "sk-bench-upstream"  # the mock ignores it; the OpenAI client insists on one
_OFFLINE = (
    "LITELLM_LOCAL_MODEL_COST_MAP",
    "LITELLM_LOCAL_BLOG_POSTS",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS",
    "LITELLM_LOCAL_POLICY_TEMPLATES",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS",
)
FEATURES = [
    "auth: master key on every request (virtual keys need PostgreSQL + Prisma: not available offline)",
    "rate limits: per-deployment rpm/tpm 2^31-1, in memory (router `usage-based-routing-v2`)",
    "metering: per-response cost computed in memory (spend is persisted only with a database: none)",
    "metrics: `prometheus` callback (open source in this version), `/metrics/`",
    "tracing: `otel` callback, OTLP/HTTP protobuf to the bench's sink, every request",
    "logs: JSON (`json_logs: true`), uvicorn access log at info",
    "telemetry and remote fetches off (`LITELLM_TELEMETRY_DISABLED`, `LITELLM_LOCAL_*`)",
    "one uvicorn worker (`--num_workers 1`), uvloop",
]


def config(servers: BenchServers) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"http://127.0.0.1:{servers.mock_port}/v1",
                    "api_key": UPSTREAM_KEY,
                    "rpm": GENEROUS,
                    "tpm": GENEROUS,
                },
            }
        ],
        "router_settings": {"routing_strategy": "usage-based-routing-v2"},
        "litellm_settings": {"callbacks": ["otel", "prometheus"], "json_logs": True},
        "general_settings": {"master_key": MASTER_KEY},
    }


def environment(servers: BenchServers) -> dict[str, str]:
    """The parent's environment without anything that would steer LiteLLM (a database URL, OTel settings)."""
    drop = ("OTEL_", "LITELLM_", "PROMETHEUS_", "DATABASE_URL", "REDIS_", "PYTHONPATH", "VIRTUAL_ENV", "STRATA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({name: "True" for name in _OFFLINE})
    env.update(
        {
            "LITELLM_TELEMETRY_DISABLED": "true",
            "JSON_LOGS": "True",
            "OTEL_EXPORTER": "otlp_http",
            "OTEL_ENDPOINT": f"http://127.0.0.1:{servers.collector_port}/v1/traces",
            "OTEL_SERVICE_NAME": "litellm-bench",
        }
    )
    return env


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant: the processes that serve if LiteLLM forks workers."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


def tree_cpu_seconds(root: int) -> float:
    total = 0.0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):  # exited in between
            total += cpu_seconds(pid)
    return total


class LiteLLMProxy:
    """`litellm --config ... --num_workers 1` on a free port; a context manager that always stops it."""

    def __init__(self, servers: BenchServers, log: Any = print) -> None:
        self.servers = servers
        self.log = log
        self.port = free_port()
        self.workdir = servers.workdir / "litellm"
        self.proc: Process | None = None
        self.ready_after_s = 0.0
        self.version = "-"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> LiteLLMProxy:
        python = peer_python(self.log)
        self.version = peer_version("litellm")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "litellm.yaml"
        config_path.write_text(yaml.safe_dump(config(self.servers)))
        argv = [str(python.parent / "litellm"), "--config", str(config_path), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--num_workers", "1"]
        started = time.monotonic()
        env = environment(self.servers)
        self.proc = Process("litellm", argv, self.workdir / "litellm.log", env=env, cwd=self.workdir)
        # Importing the proxy takes 5-30 s on a busy 2-core machine.
        wait_http(f"http://127.0.0.1:{self.port}/health/readiness", self.proc, timeout_s=180)
        self.ready_after_s = time.monotonic() - started
        self._check()
        return self

    def _check(self) -> None:
        """One request through: the master key is accepted, a wrong key refused, the rpm/tpm limiter active."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        ok = httpx.post(self.url, json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
        ok.raise_for_status()
        if "x-ratelimit-limit-requests" not in ok.headers:
            raise RuntimeError("LiteLLM's deployment rpm/tpm limiter is not active (no x-ratelimit-* headers)")
        bad = httpx.post(self.url, json=body, headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
        if bad.status_code == 200:
            raise RuntimeError("LiteLLM accepted a wrong key: authentication is not on")

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = tree_pids(self.proc.pid)[1:]
        self.proc.stop()
        for pid in pids:  # workers it forked, if any outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> LiteLLMProxy:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
