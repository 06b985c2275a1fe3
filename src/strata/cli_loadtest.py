"""`strata loadtest`: steps of rising load against an OpenAI-compatible endpoint, each in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from strata.cli_exit import ExitCode
from strata.cli_profile import slo_or_exit
from strata.cli_support import invalid_option
from strata.compute.loadtest import (
    LoadTestReport,
    Outcome,
    StepKind,
    StepResult,
    StepSpec,
    Target,
    TokenSampler,
    plan_step,
    report,
    summarise,
)
from strata.compute.loadtest_render import load_label, render_loadtest, write_chart

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
STRAGGLERS_S = 5.0  # beyond a step's duration and request timeout, before its worker is stopped


def loadtest_command(
    model: Annotated[str, typer.Option(help="The model name to request.")],
    url: Annotated[str, typer.Option(help="The API base: Strata, vLLM, llama.cpp or a cloud API.")] = (
        "http://127.0.0.1:8000/v1"
    ),
    api_key: Annotated[
        str | None, typer.Option(help="Bearer key; default $STRATA_API_KEY, then $OPENAI_API_KEY.")
    ] = None,
    rate: Annotated[str | None, typer.Option(help="Open-loop steps, requests/s: e.g. 1,2,4,8.")] = None,
    concurrency: Annotated[str | None, typer.Option(help="Closed-loop steps, clients: e.g. 1,4,16.")] = None,
    duration: Annotated[float, typer.Option(help="Seconds each step sends for.")] = 30.0,
    max_requests: Annotated[int, typer.Option(help="At most this many requests per step.")] = 1000,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 120.0,
    profile: Annotated[Path | None, typer.Option(help="Draw token counts from a `strata profile --json` file.")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens per request (without --profile).")] = 128,
    max_tokens: Annotated[int, typer.Option(help="max_tokens per request (without --profile).")] = 64,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="SLO: time to first token, p50, ms.")] = None,
    slo_ttft_p95_ms: Annotated[float | None, typer.Option(help="SLO: time to first token, p95, ms.")] = None,
    slo_itl_p95_ms: Annotated[float | None, typer.Option(help="SLO: gap between chunks, p95, ms.")] = None,
    slo_e2e_p95_s: Annotated[float | None, typer.Option(help="SLO: end-to-end latency, p95, s.")] = None,
    slo_e2e_p99_s: Annotated[float | None, typer.Option(help="SLO: end-to-end latency, p99, s.")] = None,
    max_error_rate: Annotated[float, typer.Option(help="A step with more failed requests misses.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the drawn prompts and arrivals.")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    chart: Annotated[Path | None, typer.Option(help="Write a chart (.svg or .png).")] = None,
) -> None:
    """Find the highest load an endpoint serves within the SLOs: throughput, TTFT, inter-token and
    end-to-end latency per step."""
    kind, loads = _steps(rate, concurrency)
    for name, value in (("--duration", duration), ("--timeout", timeout), ("--max-requests", max_requests),
                        ("--prompt-tokens", prompt_tokens), ("--max-tokens", max_tokens)):  # fmt: skip
        if value <= 0:
            invalid_option(f"{name}: must be more than 0, got {value:g}")
    if not 0 <= max_error_rate <= 1:
        invalid_option(f"--max-error-rate: must be between 0 and 1, got {max_error_rate:g}")
    if chart is not None and chart.suffix.lower() not in (".svg", ".png"):
        invalid_option(f"--chart: {chart.name} must end in .svg or .png")
    prompt, completion = _samplers(profile, prompt_tokens, max_tokens)
    slo = slo_or_exit(slo_ttft_ms, slo_ttft_p95_ms, slo_itl_p95_ms, slo_e2e_p95_s, slo_e2e_p99_s)
    key = api_key or os.environ.get("STRATA_API_KEY") or os.environ.get("OPENAI_API_KEY")
    target = Target(url=url, model=model, api_key=key)
    steps: list[StepResult] = []
    progress_console = err if as_json else out
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=progress_console, transient=True
    ) as progress:
        for load in loads:
            spec = plan_step(target, kind, load, duration_s=duration, max_requests=max_requests, timeout_s=timeout,
                             prompt=prompt, completion=completion, seed=seed)  # fmt: skip
            task = progress.add_task(f"step {load_label(kind, load)}", total=duration)
            raw = _run_worker(spec, lambda elapsed, task=task: progress.update(task, completed=min(elapsed, duration)))
            progress.update(task, completed=duration)
            outcomes = [Outcome(**o) for o in raw["outcomes"]]
            steps.append(summarise(kind, load, outcomes, raw["wall_s"], slo, max_error_rate=max_error_rate,
                                   lags_s=raw["lags_s"], cpu_s=raw["cpu_s"]))  # fmt: skip
            if outcomes and all(not o.ok and o.status == 0 for o in outcomes):
                break  # nothing answers at all: more load will not change that
    result: LoadTestReport = report(target, kind, steps, slo)
    if chart is not None:
        write_chart(result, chart)
    if as_json:
        sys.stdout.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_loadtest(result, out)
        if chart is not None:
            out.print(f"chart: {escape(str(chart))}", highlight=False)
    if all(step.completed == 0 for step in steps):
        raise typer.Exit(ExitCode.FAILED)


def _run_worker(spec: StepSpec, tick: Callable[[float], object]) -> dict[str, object]:
    """One step in its own process; `tick(elapsed_s)` while it runs. Its answer goes to a file rather than a
    pipe: a step's outcomes outgrow a pipe's buffer, and a child blocked on a full pipe never exits."""
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        stdin.write(orjson.dumps(spec.to_json()))
        stdin.seek(0)
        process = subprocess.Popen(
            [sys.executable, "-m", "strata.compute.loadtest_worker"], stdin=stdin, stdout=stdout, stderr=stderr
        )
        started = time.monotonic()
        limit = spec.duration_s + spec.timeout_s + STRAGGLERS_S
        while process.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > limit:
                process.kill()
                process.wait()
                _fail(f"step {load_label(spec.kind, spec.load)} did not finish within {limit:g} s")
            tick(elapsed)
            time.sleep(0.1)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            _fail(f"the load generator failed (exit {process.returncode}): {tail[0]}")
        return orjson.loads(stdout.read())  # type: ignore[no-any-return]


def _steps(rate: str | None, concurrency: str | None) -> tuple[StepKind, list[float]]:
    if (rate is None) == (concurrency is None):
        invalid_option("give exactly one of --rate (open loop, requests/s) or --concurrency (closed loop, clients)")
    kind: StepKind = "rate" if rate is not None else "concurrency"
    text = rate if rate is not None else concurrency
    assert text is not None
    try:
        loads = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        invalid_option(f"--{kind}: {text!r} is not a comma-separated list of numbers")
    if not loads or any(load <= 0 for load in loads):
        invalid_option(f"--{kind}: every step must be more than 0, got {text!r}")
    if kind == "concurrency" and any(not load.is_integer() for load in loads):
        invalid_option(f"--concurrency: clients are whole numbers, got {text!r}")
    return kind, sorted(loads)


def _samplers(profile: Path | None, prompt_tokens: int, max_tokens: int) -> tuple[TokenSampler, TokenSampler]:
    if profile is None:
        return TokenSampler.fixed(prompt_tokens), TokenSampler.fixed(max_tokens)
    try:
        tokens = orjson.loads(profile.read_bytes())["tokens"]
        return TokenSampler.from_profile(tokens["prompt"]), TokenSampler.from_profile(tokens["completion"])
    except OSError as exc:
        invalid_option(f"--profile: cannot read {profile}: {exc.strerror}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        invalid_option(f"--profile {profile}: not a `strata profile --json` report with token histograms ({exc})")


def _fail(message: str) -> NoReturn:
    err.print(f"[red]loadtest failed:[/] {escape(message)}", highlight=False)
    raise typer.Exit(ExitCode.FAILED)
