"""`strata profile`: the workload behind the usage records (or an imported request log), before sizing it.

Reads the database directly, like `strata usage` (the machine's operator is trusted)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from strata.cli_support import invalid_option, load_or_exit, on_database, option_error
from strata.compute.catalog import ModelNotFound, find_model
from strata.compute.planner import PlanError
from strata.compute.self_host import SelfHostEstimate, estimate, measured_from_loadtest
from strata.compute.workload import Call, Slo, WorkloadProfile, profile
from strata.compute.workload_import import WorkloadFileError, read_jsonl
from strata.compute.workload_render import profile_html, render_profile, render_self_host
from strata.cost.query import UsageQuery, iso
from strata.cost.records import UsageEvent
from strata.store.database import Database
from strata.store.usage import UsageStore

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def profile_command(
    since: Annotated[str | None, typer.Option("--from", help="ISO date or date-time, UTC; default this month")] = None,
    until: Annotated[str | None, typer.Option("--to", help="ISO date (included) or date-time (excluded).")] = None,
    model: Annotated[str | None, typer.Option(help="Only calls to this model.")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's run steps.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this API key id.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user's calls.")] = None,
    kind: Annotated[str | None, typer.Option(help="chat (API requests) or run_step (agent model calls).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Profile this JSONL request log instead of the usage records.")
    ] = None,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="SLO: time to first token, p50, ms.")] = None,
    slo_ttft_p95_ms: Annotated[float | None, typer.Option(help="SLO: time to first token, p95, ms.")] = None,
    slo_itl_p95_ms: Annotated[float | None, typer.Option(help="SLO: inter-token latency, p95, ms.")] = None,
    slo_e2e_p95_s: Annotated[float | None, typer.Option(help="SLO: end-to-end latency, p95, s.")] = None,
    slo_e2e_p99_s: Annotated[float | None, typer.Option(help="SLO: end-to-end latency, p99, s.")] = None,
    plan: Annotated[
        str | None, typer.Option("--plan", help="Size self-hosting this model (a `strata plan` name) for the load.")
    ] = None,
    gpu: Annotated[str, typer.Option(help="--plan: the GPU model (its price is cost.gpu_prices).")] = "H100",
    quant: Annotated[str | None, typer.Option(help="--plan: weight quantisation, as in `strata plan`.")] = None,
    loadtest: Annotated[
        Path | None, typer.Option(help="--plan: a `strata loadtest --json` report of the real server.")
    ] = None,
    api_input_usd_per_mtok: Annotated[
        float | None, typer.Option(help="--plan: price the traffic at this API input price instead.")
    ] = None,
    api_output_usd_per_mtok: Annotated[float | None, typer.Option(help="--plan: ... and output price.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
    html: Annotated[Path | None, typer.Option(help="Also write a self-contained HTML report with charts.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Path to strata.yaml.")] = None,
) -> None:
    """Token distributions, traffic and concurrency, latency against SLOs, and spend of a workload."""
    slo = slo_or_exit(slo_ttft_ms, slo_ttft_p95_ms, slo_itl_p95_ms, slo_e2e_p95_s, slo_e2e_p99_s)
    filters = {k: v for k, v in (("model", model), ("agent", agent), ("key", key), ("user", user), ("kind", kind)) if v}
    if kind is not None and kind not in ("chat", "run_step"):
        invalid_option(f"--kind: must be chat or run_step, got {kind!r}")
    prices = (api_input_usd_per_mtok, api_output_usd_per_mtok)
    if (prices[0] is None) != (prices[1] is None) or any(p is not None and p < 0 for p in prices):
        invalid_option("--api-input-usd-per-mtok and --api-output-usd-per-mtok go together, each 0 or more")
    loaded = load_or_exit(config) if file is None or plan is not None else None
    if plan is not None and loaded is not None and gpu not in loaded.cost.gpu_prices:
        named = ", ".join(loaded.cost.gpu_prices) or "none"
        invalid_option(f"--gpu: no price for {gpu!r} in cost.gpu_prices (has {named})")
    if file is not None:
        if since or until or filters:
            invalid_option("--file profiles the whole log: --from, --to, --model, --agent, --key, --user and --kind "
                     "select usage records, not lines of a file")  # fmt: skip
        result = _from_file(file, slo)
    else:
        try:
            query = UsageQuery.model_validate({"from": since, "to": until})
        except ValidationError as exc:
            invalid_option(option_error(exc))

        async def work(db: Database) -> WorkloadProfile:
            store = UsageStore(db)
            events = await store.events(query.since, query.until, filters=filters)
            runs = sorted({e.run_id for e in events if e.run_id})
            tools = await store.tool_calls_per_run(runs) if runs else {}
            window = {"from": iso(query.since), "to": iso(query.until)}
            return profile([call_of(e) for e in events], slo=slo, tools_per_run=tools, filters={**window, **filters})

        assert loaded is not None
        result = on_database(loaded, work, what="read usage", table="usage")
    sizing = None
    if plan is not None and loaded is not None:
        usd_per_hour = loaded.cost.gpu_prices[gpu]
        sizing = _self_host(result, plan, gpu, usd_per_hour, quant, loadtest, prices, window_days(result))
    if html is not None:
        html.write_text(profile_html(result))
    if as_json:
        body = result.to_json() | ({"self_host": sizing.to_json()} if sizing else {})
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    render_profile(result, out)
    if sizing is not None:
        render_self_host(sizing, out)
    if html is not None:
        out.print(f"HTML report: {escape(str(html))}", highlight=False)


def slo_or_exit(
    ttft_ms: float | None, ttft_p95_ms: float | None, itl_p95_ms: float | None,
    e2e_p95_s: float | None, e2e_p99_s: float | None,
) -> Slo:  # fmt: skip
    """The --slo-* options of `profile` and `loadtest`, each more than 0 when given."""
    for name, value in (("--slo-ttft-ms", ttft_ms), ("--slo-ttft-p95-ms", ttft_p95_ms),
                        ("--slo-itl-p95-ms", itl_p95_ms), ("--slo-e2e-p95-s", e2e_p95_s),
                        ("--slo-e2e-p99-s", e2e_p99_s)):  # fmt: skip
        if value is not None and value <= 0:
            invalid_option(f"{name}: must be more than 0, got {value:g}")
    return Slo(ttft_ms=ttft_ms, ttft_p95_ms=ttft_p95_ms, itl_p95_ms=itl_p95_ms, e2e_p95_s=e2e_p95_s,
               e2e_p99_s=e2e_p99_s)  # fmt: skip


def window_days(result: WorkloadProfile) -> float:
    """The days the profile covers: its query window, else the first to the last call (at least an hour)."""
    if "from" in result.filters and "to" in result.filters:
        since = datetime.fromisoformat(result.filters["from"].replace("Z", "+00:00"))
        until = datetime.fromisoformat(result.filters["to"].replace("Z", "+00:00"))
        return max((until - since).total_seconds(), 3600.0) / 86400
    if result.traffic is not None:
        return max((result.traffic.last - result.traffic.first).total_seconds(), 3600.0) / 86400
    return 1.0


def _self_host(
    result: WorkloadProfile,
    model: str,
    gpu: str,
    usd_per_hour: float,
    quant: str | None,
    loadtest: Path | None,
    prices: tuple[float | None, float | None],
    days: float,
) -> SelfHostEstimate:
    measured = None
    if loadtest is not None:
        try:
            measured = measured_from_loadtest(orjson.loads(loadtest.read_bytes()), loadtest.name)
        except OSError as exc:
            invalid_option(f"--loadtest: cannot read {loadtest}: {exc.strerror}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            invalid_option(f"--loadtest {loadtest}: {exc}")
    try:
        return estimate(
            result, find_model(model), gpu=gpu, gpu_usd_per_hour=usd_per_hour,
            price_source=f"cost.gpu_prices[{gpu}]", window_days=days, quant=quant, measured=measured,
            api_usd_per_mtok=(prices[0], prices[1]) if prices[0] is not None and prices[1] is not None else None,
        )  # fmt: skip
    except (ModelNotFound, PlanError) as exc:
        invalid_option(f"--plan {model}: {exc}")


def call_of(event: UsageEvent) -> Call:
    return Call(
        model=event.model, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
        end=event.ts, latency_s=event.latency_s, ttft_s=event.ttft_s, status=event.status, cost_usd=event.cost_usd,
        kind=event.kind, agent=event.agent, key_id=event.key_id, user=event.user, run_id=event.run_id,
    )  # fmt: skip


def _from_file(path: Path, slo: Slo) -> WorkloadProfile:
    try:
        with path.open("rb") as lines:
            imported = read_jsonl(lines)
    except OSError as exc:
        invalid_option(f"--file: cannot read {path}: {exc.strerror}")
    except WorkloadFileError as exc:
        invalid_option(f"--file {path}: {exc}")
    notes = []
    if imported.completion_from_limits:
        notes.append(f"{imported.completion_from_limits} completions are request limits, not measured")
    if imported.without_time:
        notes.append(f"{imported.without_time} lines without a timestamp")
    source = f"{path.name}" + (f" ({'; '.join(notes)})" if notes else "")
    return profile(imported.calls, slo=slo, source=source)
