"""The workload profile's numbers on calls whose answers are known by hand, the request-log reader's errors,
and the reports' shape (80 columns; one self-contained HTML file)."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from rich.console import Console

from strata.compute.workload import Call, Slo, nearest_rank, profile
from strata.compute.workload_import import WorkloadFileError, read_jsonl
from strata.compute.workload_render import profile_html, render_profile

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def call(start_s: float, latency_s: float, prompt: int = 10, completion: int = 5, **extra: object) -> Call:
    return Call(
        model=str(extra.pop("model", "m")),
        prompt_tokens=prompt,
        completion_tokens=completion,
        end=T0 + timedelta(seconds=start_s + latency_s),
        latency_s=latency_s,
        **extra,  # type: ignore[arg-type]
    )


def test_nearest_rank_is_always_an_observed_value() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert nearest_rank(values, 50) == 5.0
    assert nearest_rank(values, 90) == 9.0
    assert nearest_rank(values, 99) == 10.0
    assert nearest_rank([7.0], 99) == 7.0


def test_concurrency_peak_mean_and_p95_over_time() -> None:
    # [0,10), [5,15), [12,20): two at once during 5..10 and 12..15; busy 28 call-seconds over a 20 s window
    result = profile([call(0, 10), call(5, 10), call(12, 8)])
    traffic = result.traffic
    assert traffic is not None
    assert traffic.peak_concurrency == 2
    assert traffic.mean_concurrency == pytest.approx(28 / 20)
    assert traffic.p95_concurrency == 2  # two at once for 8 of 20 s: more than 5% of the time
    assert traffic.peak_rpm == 3 and traffic.burstiness == 0.0


def test_a_short_spike_sets_the_peak_but_not_the_p95() -> None:
    steady = [call(i * 10, 10) for i in range(60)]  # one at a time for 10 minutes
    spike = [call(300, 1) for _ in range(9)]  # nine more for one second
    result = profile(steady + spike)
    assert result.traffic is not None
    assert result.traffic.peak_concurrency == 10
    assert result.traffic.p95_concurrency == 1


def test_tokens_latency_slos_runs_and_spend() -> None:
    calls = [
        call(0, 1.0, prompt=100, completion=20, ttft_s=0.2, cost_usd=0.01, agent="a", run_id="r1", user="u1"),
        call(2, 2.0, prompt=300, completion=40, ttft_s=0.4, cost_usd=0.03, agent="a", run_id="r1", user="u1"),
        call(4, 4.0, prompt=200, completion=30, ttft_s=0.3, cost_usd=0.02, run_id=None, user="u2", model="n"),
        call(9, 9.0, prompt=999, completion=1, status=502, cost_usd=0.0),
    ]
    result = profile(calls, slo=Slo(ttft_p95_ms=350, e2e_p95_s=5), tools_per_run={"r1": 3})
    assert result.calls == 4 and result.errors == 1
    assert result.tokens.prompt is not None and result.tokens.prompt.max == 999
    assert result.by_model["m"].calls == 3 and result.by_model["n"].calls == 1
    assert result.latency.e2e_s is not None and result.latency.e2e_s.count == 3  # the error is left out
    assert result.latency.e2e_s.p(95) == 4.0
    assert result.latency.itl_s is not None and result.latency.itl_s.p(50) == pytest.approx(0.8 / 19)
    ttft, e2e = result.slos
    assert (ttft.label, ttft.achieved, ttft.met) == ("TTFT p95", pytest.approx(400.0), False)
    assert (e2e.achieved, e2e.met) == (4.0, True)
    runs = result.runs
    assert runs is not None and runs.runs == 1
    assert runs.steps is not None and runs.steps.max == 2
    assert runs.tools is not None and runs.tools.max == 3
    assert runs.duration_s is not None and runs.duration_s.max == pytest.approx(4.0)  # 0 s to 4 s
    assert runs.cost_per_run_usd == pytest.approx(0.04)
    assert result.spend.total_usd == pytest.approx(0.06)
    assert result.spend.per_1k_requests_usd == pytest.approx(15.0)
    assert list(result.spend.by_user) == ["u1", "u2"]


def test_request_log_lines_in_each_shape() -> None:
    lines = [
        orjson.dumps({"model": "gpt-x", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 64}),
        orjson.dumps(
            {
                "custom_id": "1",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-x", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            }
        ),
        orjson.dumps(
            {
                "request": {"model": "gpt-y", "messages": [{"role": "user", "content": "q"}]},
                "response": {"usage": {"prompt_tokens": 70, "completion_tokens": 9}},
                "timestamp": "2026-12-01T09:00:00Z",
                "latency_s": 1.5,
            }
        ),
        b"",
    ]
    imported = read_jsonl(lines)
    first, second, third = imported.calls
    assert (first.prompt_tokens, first.completion_tokens) == (10, 64)  # 40 bytes / 4; the limit as completion
    assert (second.prompt_tokens, second.completion_tokens) == (1, 0)
    assert (third.prompt_tokens, third.completion_tokens, third.end) == (70, 9, T0 + timedelta(seconds=1.5))
    assert imported.completion_from_limits == 2 and imported.without_time == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "line 2: not JSON"),
        (b"[1, 2]", "line 2: expected a JSON object"),
        (b'{"prompt": "legacy"}', "line 2: no chat request here"),
        (b'{"messages": [], "timestamp": "yesterday"}', "line 2: 'timestamp' 'yesterday' is not ISO 8601"),
        (b'{"messages": [], "latency_s": -1}', "line 2: 'latency_s' must be a non-negative"),
    ],
)
def test_a_bad_line_is_named(line: bytes, message: str) -> None:
    good = orjson.dumps({"messages": [{"role": "user", "content": "fine"}]})
    with pytest.raises(WorkloadFileError, match=re.escape(message)):
        read_jsonl([good, line])


def _sample() -> list[Call]:
    return [
        call(i * 7.0, 0.5 + (i % 5) / 10, prompt=100 + i * 13, completion=10 + i % 7, ttft_s=0.1,
             cost_usd=0.001 * i, agent="triage" if i % 2 else None, run_id=f"r{i // 3}" if i % 2 else None,
             user=f"user-{i % 3}", key_id=f"key_{i % 2}", model="a-model-with-a-rather-long-name" if i % 4 else "m")
        for i in range(40)
    ]  # fmt: skip


def test_the_terminal_report_stays_within_80_columns() -> None:
    buffer = io.StringIO()
    render_profile(profile(_sample(), slo=Slo(ttft_p95_ms=500, e2e_p95_s=1)), Console(file=buffer, width=80))
    text = buffer.getvalue()
    assert "40 calls" in text and "SLO" in text and "agent runs" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_html_report_is_one_self_contained_file() -> None:
    page = profile_html(profile(_sample()))
    assert page.count("<svg") >= 4  # prompt and completion histograms, traffic, latency, spend
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "nothing may be fetched from elsewhere"
    assert "<script" not in page


def test_an_empty_window_says_so() -> None:
    buffer = io.StringIO()
    render_profile(profile([]), Console(file=buffer, width=80))
    assert "nothing to profile" in buffer.getvalue()
