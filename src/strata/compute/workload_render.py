"""A workload profile for people: tables at 80 columns in the terminal, and a self-contained HTML report.

The HTML report is one file with its charts inlined as SVG (matplotlib, no JavaScript, nothing fetched), so
it can be mailed or attached to a ticket and opens the same anywhere.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from strata.compute.charts import pyplot
from strata.compute.self_host import SelfHostEstimate
from strata.compute.workload import Distribution, TokenProfile, WorkloadProfile


def render_profile(profile: WorkloadProfile, console: Console) -> None:
    if profile.calls == 0:
        console.print(Text(f"no calls in {profile.source}{_filters(profile)}: nothing to profile"))
        return
    console.print(Text(f"{profile.calls:,} calls from {profile.source}{_filters(profile)}, {profile.errors:,} errors"))
    console.print(_token_table(profile))
    if profile.traffic is not None:
        t = profile.traffic
        table = Table("traffic", "value", title=f"{t.first:%Y-%m-%d %H:%M} to {t.last:%Y-%m-%d %H:%M} UTC")
        table.add_row("requests/min, peak", f"{t.peak_rpm:,}")
        table.add_row("requests/min, mean", f"{t.mean_rpm:,.1f}")
        table.add_row("burstiness (CV per min)", f"{t.burstiness:.2f}")
        table.add_row("concurrency, peak", f"{t.peak_concurrency:,}")
        table.add_row("concurrency, p95 of time", f"{t.p95_concurrency:,}")
        table.add_row("concurrency, mean", f"{t.mean_concurrency:.2f}")
        busiest = max(range(24), key=lambda hour: t.by_hour[hour])
        table.add_row("busiest hour (UTC)", f"{busiest:02d}:00 ({t.by_hour[busiest]:,} calls)")
        console.print(table)
    console.print(_latency_table(profile))
    if profile.slos:
        table = Table("SLO", "target", "achieved", "")
        for slo in profile.slos:
            achieved = "-" if slo.achieved is None else f"{slo.achieved:,.1f} {slo.unit}"
            verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: "not measured"}[slo.met]
            table.add_row(slo.label, f"{slo.target:g} {slo.unit}", achieved, verdict)
        console.print(table)
    if profile.runs is not None:
        r = profile.runs
        title = f"{r.runs:,} runs, ${r.cost_per_run_usd:.6f} each"
        table = Table("agent runs", "p50", "p90", "p99", "max", title=title)
        for label, dist in (("model steps", r.steps), ("tool calls", r.tools), ("duration (s)", r.duration_s)):
            if dist is not None:
                table.add_row(label, *_row(dist))
        console.print(table)
    console.print(_spend_table(profile))


def _filters(profile: WorkloadProfile) -> str:
    if not profile.filters:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in profile.filters.items()) + ")"


def _row(dist: Distribution, percentiles: Iterable[int] = (50, 90, 99), scale: float = 1.0) -> list[str]:
    digits = 0 if scale == 1.0 and float(dist.max).is_integer() else 1
    return [f"{dist.p(p) * scale:,.{digits}f}" for p in percentiles] + [f"{dist.max * scale:,.{digits}f}"]


def _token_table(profile: WorkloadProfile) -> Table:
    table = Table("tokens", "calls", "p50", "p90", "p99", "max", title="tokens per call")

    def add(label: str, tokens: TokenProfile) -> None:
        if tokens.prompt is not None and tokens.completion is not None:
            table.add_row(f"{label} prompt", f"{tokens.calls:,}", *_row(tokens.prompt))
            table.add_row(f"{label} completion", "", *_row(tokens.completion))

    add("all", profile.tokens)
    for name, tokens in profile.by_model.items():
        add(f"model {name}", tokens)
    for name, tokens in profile.by_agent.items():
        add(f"agent {name}", tokens)
    return table


def _latency_table(profile: WorkloadProfile) -> Table:
    table = Table("latency (ms)", "calls", "p50", "p95", "p99", "max", title="latency of successful calls")
    for label, dist in (
        ("time to first token", profile.latency.ttft_s),
        ("inter-token", profile.latency.itl_s),
        ("end-to-end", profile.latency.e2e_s),
    ):
        if dist is not None:
            table.add_row(label, f"{dist.count:,}", *_row(dist, (50, 95, 99), scale=1000.0))
    return table


def _spend_table(profile: WorkloadProfile) -> Table:
    s = profile.spend
    table = Table("spend", "USD", title=f"${s.total_usd:,.6f} in all, ${s.per_1k_requests_usd:,.6f} per 1,000 requests")
    for group, totals in (("model", s.by_model), ("agent", s.by_agent), ("user", s.by_user), ("key", s.by_key)):
        for name, usd in list(totals.items())[:5]:
            table.add_row(f"{group} {name}", f"{usd:,.6f}")
    return table


def profile_html(profile: WorkloadProfile) -> str:
    """The report as one self-contained HTML page: the terminal tables, and charts inlined as SVG."""
    buffer = io.StringIO()
    render_profile(profile, Console(file=buffer, width=100, record=True, color_system=None))
    tables = html.escape(buffer.getvalue())
    charts = "\n".join(f"<figure>{svg}</figure>" for svg in _charts(profile))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Strata workload profile</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "pre{background:#f6f8fa;padding:1em;overflow:auto}figure{display:inline-block;margin:0 1em 1em 0}"
        "svg{max-width:520px;height:auto}</style></head><body>"
        f"<h1>Workload profile</h1><p>{profile.calls:,} calls from {html.escape(profile.source)}"
        f"{html.escape(_filters(profile))}</p>{charts}<h2>Numbers</h2><pre>{tables}</pre></body></html>\n"
    )


def _charts(profile: WorkloadProfile) -> list[str]:
    if profile.calls == 0:
        return []
    plt = pyplot()
    svgs: list[str] = []

    def figure(title: str, draw) -> None:  # type: ignore[no-untyped-def]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        draw(ax)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        out = io.StringIO()
        fig.savefig(out, format="svg")
        plt.close(fig)
        svg = out.getvalue()
        svgs.append(svg[svg.index("<svg") :])  # drop the XML prolog: inlined in HTML

    for label, dist in (("prompt", profile.tokens.prompt), ("completion", profile.tokens.completion)):
        if dist is None:
            continue

        def bars(ax, dist: Distribution = dist, label: str = label) -> None:  # type: ignore[no-untyped-def]
            lows = [low for low, _, _ in dist.histogram]
            widths = [max(high - low, 1e-9) for low, high, _ in dist.histogram]
            ax.bar(lows, [n for _, _, n in dist.histogram], width=widths, align="edge", edgecolor="white")
            ax.set_xlabel(f"{label} tokens per call")
            ax.set_ylabel("calls")

        figure(f"{label} tokens (p50 {dist.p(50):,.0f}, p99 {dist.p(99):,.0f})", bars)
    if profile.traffic is not None and len(profile.traffic.per_minute) > 1:
        traffic = profile.traffic

        def rate(ax) -> None:  # type: ignore[no-untyped-def]
            ax.plot([m for m, _ in traffic.per_minute], [n for _, n in traffic.per_minute], drawstyle="steps-post")
            ax.set_ylabel("requests per minute")
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)

        figure(f"traffic (peak {traffic.peak_rpm}/min, peak concurrency {traffic.peak_concurrency})", rate)
    latency = [(n, d) for n, d in (("TTFT", profile.latency.ttft_s), ("end-to-end", profile.latency.e2e_s)) if d]
    if latency:

        def percentiles(ax) -> None:  # type: ignore[no-untyped-def]
            for offset, (name, dist) in enumerate(latency):
                xs = [i * 3 + offset for i in range(3)]
                ax.bar(xs, [dist.p(p) * 1000 for p in (50, 95, 99)], label=name)
            ax.set_xticks([i * 3 + 0.5 for i in range(3)], ["p50", "p95", "p99"])
            ax.set_ylabel("ms")
            ax.legend(fontsize=8)

        figure("latency of successful calls", percentiles)
    if profile.spend.total_usd > 0:
        top = list(profile.spend.by_model.items())[:8]

        def spend(ax) -> None:  # type: ignore[no-untyped-def]
            ax.barh([name for name, _ in top][::-1], [usd for _, usd in top][::-1])
            ax.set_xlabel("USD")

        figure("spend by model", spend)
    return svgs


def render_self_host(estimate: SelfHostEstimate, console: Console) -> None:
    """The sizing and the self-host verdict, with every assumption and where it came from."""
    p = estimate.plan
    console.print(
        Text(
            f"self-hosting {p.shape.name}: {estimate.replicas} replica(s) x TP={p.tensor_parallel_size} on "
            f"{estimate.gpu} = {estimate.gpus_total} GPU(s), ${estimate.self_host_usd_per_month:,.0f}/month; "
            f"the same traffic on the API: ${estimate.api_usd_per_month:,.2f}/month",
            style="bold",
        )
    )
    table = Table("assumption", "value", "source", title="what the estimate rests on")
    for a in estimate.assumptions:
        table.add_row(a.name, f"{a.value:,.4g} {a.unit}", a.source)
    console.print(table)
    used = f"{estimate.utilisation:.2%}"
    if estimate.break_even_utilisation is None:
        console.print(Text(f"the traffic costs nothing on the API: self-hosting never pays (utilisation {used})"))
    else:
        console.print(
            Text(
                f"utilisation of that capacity by the traffic: {used}; break-even: "
                f"{estimate.break_even_utilisation:.2%}. Cheaper: {estimate.cheaper}.",
                style="bold green" if estimate.cheaper == "self-host" else "bold",
            )
        )
    console.rule("start one replica by hand", align="left")
    console.print(Text(p.vllm_command()), soft_wrap=True)
