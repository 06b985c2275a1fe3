"""`strata loadtest`'s report: one row per step in the terminal (80 columns), and a chart of latency and
throughput against the offered load."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from strata.compute.charts import pyplot
from strata.compute.loadtest import LoadTestReport, StepResult


def load_label(kind: str, load: float) -> str:
    if kind == "rate":
        return f"{load:g} rps"
    return f"{load:g} client" + ("" if load == 1 else "s")


def _ms(step: StepResult, metric: str, percentile: int) -> str:
    distribution = getattr(step.latency, metric)
    return "-" if distribution is None else f"{distribution.p(percentile) * 1000:,.0f}"


def render_loadtest(result: LoadTestReport, console: Console) -> None:
    table = Table(
        "load", "ok/sent", "req/s", "tok/s", "TTFT\np50", "TTFT\np95", "ITL\np95", "e2e\np95", "SLOs",
        title=f"{result.model} at {result.target} (latencies in ms)",
    )  # fmt: skip
    for step in result.steps:
        verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[step.meets_slos]
        table.add_row(
            load_label(result.kind, step.load),
            f"{step.completed}/{step.sent}",
            f"{step.achieved_rps:,.1f}",
            f"{step.output_tokens_per_s:,.0f}",
            _ms(step, "ttft_s", 50),
            _ms(step, "ttft_s", 95),
            _ms(step, "itl_s", 95),
            _ms(step, "e2e_s", 95),
            verdict,
        )
    console.print(table)
    for step in result.steps:
        for example in step.error_examples:
            console.print(Text(f"{load_label(result.kind, step.load)}: {example}", style="yellow"))
    if not result.slo.checks():
        console.print("no SLOs given: every step that answered without too many errors counts as met")
    if result.best is None:
        console.print(Text("no step met the SLOs", style="bold red"))
    else:
        console.print(Text(f"highest load meeting the SLOs: {load_label(result.kind, result.best)}", style="bold"))


def write_chart(result: LoadTestReport, path: Path) -> None:
    """Latency percentiles and throughput against the offered load; SVG or PNG by the file's suffix."""
    plt = pyplot()
    loads = [s.load for s in result.steps]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 4))
    for metric, label in (("ttft_s", "TTFT"), ("e2e_s", "end-to-end")):
        for percentile, style in ((50, "-o"), (95, "--s")):
            values = [
                getattr(s.latency, metric).p(percentile) * 1000 if getattr(s.latency, metric) else float("nan")
                for s in result.steps
            ]
            latency.plot(loads, values, style, label=f"{label} p{percentile}")
    latency.set_ylabel("ms")
    throughput.plot(loads, [s.achieved_rps for s in result.steps], "-o", label="requests/s")
    tokens = throughput.twinx()
    tokens.plot(loads, [s.output_tokens_per_s for s in result.steps], "--s", color="tab:orange", label="tokens/s")
    throughput.set_ylabel("completed requests/s")
    tokens.set_ylabel("output tokens/s")
    for ax in (latency, throughput):
        ax.set_xlabel("offered load (" + ("requests/s" if result.kind == "rate" else "concurrent clients") + ")")
        ax.grid(True, alpha=0.3)
    if result.best is not None:
        latency.axvline(result.best, color="green", alpha=0.4, label="highest meeting SLOs")
    latency.legend(fontsize=8)
    throughput.legend(loc="upper left", fontsize=8)
    tokens.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result.model}: latency and throughput against load", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
