"""The lists to find things by (`GET /v1/runs`, `/v1/sessions`, `/v1/traces`) and the CLI over them
(`strata runs ...`, `strata sessions list`, `strata run` printing its id and asking for approvals), against a
real `strata serve` and the scripted mock model."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pexpect
import pytest

from strata.cli_exit import ExitCode
from tests.conftest import mock_model
from tests.support.databases import postgres_database
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.runs import agent, wait_status
from tests.support.strata_process import StrataProcess


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    config = {
        "models": [mock_model(mock_backend, input_usd_per_mtok=1000.0, output_usd_per_mtok=2000.0)],
        "agents": [
            agent("helper", tools=["calculator"]),
            agent("other"),
            agent("approver", tools=["calculator"], require_approval=["calculator"]),
        ],
        "runs": {"lease_s": 2, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(tmp_path_factory.mktemp("lists"), config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


@pytest.fixture(scope="module")
def keys(strata: StrataProcess) -> dict[str, str]:
    return {
        "ada": strata.create_key("user", name="ada", user="ada"),
        "bob": strata.create_key("user", name="bob", user="bob"),
        "auditor": strata.create_key("auditor", name="aud", user="aud"),
    }


def run_as(strata: StrataProcess, key: str, agent_name: str, text: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{strata.url}/v1/agents/{agent_name}/runs",
        json={"input": text, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def listing(strata: StrataProcess, key: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(strata.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def all_pages(strata: StrataProcess, key: str, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = listing(strata, key, path, **params, **({"cursor": cursor} if cursor else {})).json()
        items += page["data"]
        assert page["has_more"] == (page["next_cursor"] is not None)
        if not page["has_more"]:
            return items
        cursor = page["next_cursor"]


def cli(strata: StrataProcess, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STRATA_API_KEY"}
    if key is not None:
        env["STRATA_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "strata", *args, "--url", strata.url],
        capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "80"},
    )  # fmt: skip


def test_runs_are_listed_newest_first_in_pages_with_no_gaps_while_runs_start(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.when({}, Reply(content="ok"))
    made = [run_as(strata, keys["ada"], "helper", f"q{i}")["id"] for i in range(7)]
    first = listing(strata, keys["ada"], "/v1/runs", limit=3, agent="helper").json()
    assert [r["id"] for r in first["data"]] == made[::-1][:3]
    assert first["has_more"] and first["object"] == "list"
    newer = run_as(strata, keys["ada"], "helper", "started while paging")["id"]  # must not shift the pages
    seen = [r["id"] for r in first["data"]]
    cursor = first["next_cursor"]
    while cursor:
        page = listing(strata, keys["ada"], "/v1/runs", limit=3, agent="helper", cursor=cursor).json()
        seen += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
    assert newer not in seen
    assert seen == [r for r in made[::-1] + seen if r in made or r in seen][: len(seen)]
    assert len(seen) == len(set(seen)) and seen[:7] == made[::-1]
    everything = [r["id"] for r in all_pages(strata, keys["ada"], "/v1/runs", limit=2, agent="helper")]
    assert everything[0] == newer and everything[1:8] == made[::-1]


def test_run_filters_combine(strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]) -> None:
    mock_backend.when({}, Reply(content="ok"))
    mine = run_as(strata, keys["ada"], "other", "first")
    again = run_as(strata, keys["ada"], "other", "second", session_id=mine["session_id"])
    by_session = listing(strata, keys["ada"], "/v1/runs", session_id=mine["session_id"]).json()["data"]
    assert [r["id"] for r in by_session] == [again["id"], mine["id"]]
    assert {r["status"] for r in by_session} == {"completed"}
    assert listing(strata, keys["ada"], "/v1/runs", agent="other", status="failed,cancelled").json()["data"] == []
    completed = listing(strata, keys["ada"], "/v1/runs", agent="other", status="completed,failed").json()["data"]
    assert [r["id"] for r in completed][:2] == [again["id"], mine["id"]]
    later = listing(strata, keys["ada"], "/v1/runs", agent="other", **{"from": again["created_at"]}).json()["data"]
    assert [r["id"] for r in later] == [again["id"]]
    earlier = listing(strata, keys["ada"], "/v1/runs", agent="other", to=again["created_at"]).json()["data"]
    assert again["id"] not in [r["id"] for r in earlier] and mine["id"] in [r["id"] for r in earlier]


def test_a_user_lists_only_its_own_and_a_read_all_role_sees_everyone(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.when({}, Reply(content="ok"))
    bobs = run_as(strata, keys["bob"], "other", "bob's question")
    adas = run_as(strata, keys["ada"], "other", "ada's question")
    bob_sees = all_pages(strata, keys["bob"], "/v1/runs", limit=100)
    assert bobs["id"] in [r["id"] for r in bob_sees] and adas["id"] not in [r["id"] for r in bob_sees]
    bob_sessions = all_pages(strata, keys["bob"], "/v1/sessions")
    assert {s["owner"] for s in bob_sessions} == {"bob"}
    refused = listing(strata, keys["bob"], "/v1/runs", user="ada")
    assert (refused.status_code, refused.json()["error"]["param"]) == (403, "user")
    assert listing(strata, keys["bob"], "/v1/sessions", user="ada").status_code == 403
    assert listing(strata, keys["bob"], "/v1/runs", user="bob").status_code == 200
    audited = listing(strata, keys["auditor"], "/v1/runs", user="ada", limit=100).json()["data"]
    assert adas["id"] in [r["id"] for r in audited] and bobs["id"] not in [r["id"] for r in audited]
    everyone = [r["id"] for r in listing(strata, keys["auditor"], "/v1/runs", agent="other", limit=2).json()["data"]]
    assert everyone == [adas["id"], bobs["id"]]
    trail = httpx.get(
        f"{strata.url}/admin/audit", params={"action": "data.read_other_user"}, headers=strata.headers
    ).json()["data"]
    assert any(e["resource"] == "runs list" and "ada" in e["details"]["owners"] for e in trail)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 101}, "limit"),
        ({"limit": 0}, "limit"),
        ({"status": "running,done"}, "status"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-02-01", "to": "2026-01-01"}, None),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"stauts": "running"}, "stauts"),
    ],
)
def test_bad_list_parameters_are_400_naming_the_field(
    strata: StrataProcess, keys: dict[str, str], params: dict[str, Any], param: str | None
) -> None:
    response = listing(strata, keys["ada"], "/v1/runs", **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert (param or "'from'") in error["message"]


def test_a_cursor_of_another_list_is_refused(strata: StrataProcess, keys: dict[str, str]) -> None:
    sessions = listing(strata, keys["ada"], "/v1/sessions", limit=1).json()
    assert sessions["has_more"]
    response = listing(strata, keys["ada"], "/v1/runs", cursor=sessions["next_cursor"])
    assert (response.status_code, response.json()["error"]["param"]) == (400, "cursor")


def test_sessions_are_listed_with_their_run_counts(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.when({}, Reply(content="ok"))
    first = run_as(strata, keys["ada"], "other", "one")
    run_as(strata, keys["ada"], "other", "two", session_id=first["session_id"])
    [latest] = listing(strata, keys["ada"], "/v1/sessions", agent="other", limit=1).json()["data"]
    assert (latest["id"], latest["runs"], latest["owner"]) == (first["session_id"], 2, "ada")
    ids = [s["id"] for s in all_pages(strata, keys["ada"], "/v1/sessions", limit=2)]
    assert len(ids) == len(set(ids)) and first["session_id"] in ids


def test_traces_list_root_duration_status_and_cost(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.script(Reply(tool_calls=[ToolCallSpec("calculator", {"expression": "2+2"})]), Reply(content="4"))
    run = run_as(strata, keys["ada"], "helper", "2+2?")
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    # Spans reach the store from a background writer, and the request's own span (the root) ends last,
    # after the response: until it is stored, the run's span stands in as the root.
    while not found and time.monotonic() < deadline:
        traces = all_pages(strata, keys["ada"], "/v1/traces", limit=5)
        found = [t for t in traces if run["id"] in t["run_ids"] and t["root"]["name"].startswith("POST")]
        time.sleep(0.2)
    [trace] = found  # the request that started the run is the root
    assert trace["spans"] >= 4
    assert trace["status"] in ("ok", "unset") and trace["errors"] == 0
    assert trace["duration_ms"] > 0 and trace["cost_usd"] == pytest.approx(run["cost_usd"])
    bobs = all_pages(strata, keys["bob"], "/v1/traces", limit=50)
    assert trace["trace_id"] not in [t["trace_id"] for t in bobs]
    assert listing(strata, keys["bob"], "/v1/traces", user="ada").status_code == 403

    shown = cli(strata, keys["ada"], "runs", "trace", run["id"])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    tool = next(line for line in lines if "execute_tool" in line)
    assert "└─" in tool or "├─" in tool  # a child, drawn as one: no parent ids to decode
    assert ("█" in tool and " ms" in tool) or " µs" in tool


def test_cli_lists_shows_and_exits_by_kind_of_failure(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.when({}, Reply(content="ok"))
    run_as(strata, keys["ada"], "other", "an older one")
    run = run_as(strata, keys["ada"], "other", "list me")
    table = cli(strata, keys["ada"], "runs", "list", "--agent", "other", "--limit", "1")
    assert table.returncode == 0, table.stderr
    assert run["id"] in table.stdout and all(len(line) <= 80 for line in table.stdout.splitlines())
    assert "more: --cursor " in table.stderr
    as_json = cli(strata, keys["ada"], "runs", "list", "--agent", "other", "--json", "--limit", "1")
    assert [r["id"] for r in httpx.Response(200, content=as_json.stdout).json()["data"]] == [run["id"]]
    sessions = cli(strata, keys["ada"], "sessions", "list", "--json", "--limit", "1")
    assert httpx.Response(200, content=sessions.stdout).json()["data"][0]["id"] == run["session_id"]
    shown = cli(strata, keys["ada"], "runs", "show", run["id"])
    assert shown.returncode == 0 and "completed" in shown.stdout and "list me" not in shown.stdout
    events = cli(strata, keys["ada"], "runs", "events", run["id"])
    assert events.returncode == 0 and "run.completed" in events.stdout and "asking mock-model" in events.stdout

    assert cli(strata, keys["bob"], "runs", "show", run["id"]).returncode == ExitCode.NOT_FOUND
    no_key = cli(strata, None, "runs", "list")
    assert no_key.returncode == ExitCode.AUTH and "STRATA_API_KEY" in no_key.stderr
    assert cli(strata, keys["ada"], "runs", "cancel", run["id"]).returncode == ExitCode.CONFLICT
    assert cli(strata, keys["ada"], "runs", "list", "--status", "done").returncode == ExitCode.USAGE
    nowhere = subprocess.run(
        [sys.executable, "-m", "strata", "runs", "list", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert nowhere.returncode == ExitCode.UNREACHABLE and "strata serve" in nowhere.stderr
    version = subprocess.run([sys.executable, "-m", "strata", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("strata ")


def test_cli_approves_and_denies_a_waiting_run(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("calculator", {"expression": "1+1"}, id="c1")]),
        Reply(content="done after approval"),
    )
    waiting = cli(strata, keys["ada"], "run", "approver", "add")  # not a terminal: nobody to ask
    assert waiting.returncode == ExitCode.PENDING, waiting.stdout + waiting.stderr
    first = waiting.stdout.splitlines()[0]
    assert first.startswith("run run_")
    run_id = first.split()[1]
    assert f"strata runs approve {run_id}" in waiting.stdout
    assert "calculator" in cli(strata, keys["ada"], "runs", "show", run_id).stdout
    assert cli(strata, keys["bob"], "runs", "approve", run_id).returncode == ExitCode.NOT_FOUND
    approved = cli(strata, keys["ada"], "runs", "approve", run_id)
    assert approved.returncode == 0, approved.stderr
    assert wait_status(strata, run_id)["output"] == "done after approval"
    assert cli(strata, keys["ada"], "runs", "deny", run_id).returncode == ExitCode.CONFLICT


def test_strata_run_at_a_terminal_asks_and_goes_on(
    strata: StrataProcess, mock_backend: MockBackend, keys: dict[str, str]
) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("calculator", {"expression": "6*7"}, id="c9")]),
        Reply(content="it was denied"),
    )
    env = {**os.environ, "STRATA_API_KEY": keys["ada"], "COLUMNS": "80"}
    child = pexpect.spawn(
        sys.executable, ["-m", "strata", "run", "approver", "6*7?", "--url", strata.url],
        env=env, encoding="utf-8", timeout=30,
    )  # fmt: skip
    try:
        style = r"(?:\x1b\[[0-9;]*m)*"  # a terminal gets styles between the words
        child.expect(rf"run {style}(run_[0-9a-f]{{32}})")
        run_id = child.match.group(1)
        child.expect(rf"approval needed: {style}calculator\(\{{\"expression\":\"6\*7\"\}}\)")
        child.expect(rf"\[a\]pprove or \[d\]eny {style}calculator{style}\?")
        child.sendline("d")
        child.expect(rf"denied{style} calculator")
        child.expect("it was denied")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    final = wait_status(strata, run_id)
    assert final["output"] == "it was denied"
    messages = mock_backend.chat_requests()[-1].body["messages"]
    assert "denied" in messages[-1]["content"]


def test_the_lists_page_the_same_on_postgresql(
    mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The keyset pages, the trace grouping and its root-span window query, on the production database."""
    mock_backend.when({}, Reply(content="ok"))
    with postgres_database() as url:
        config = {"models": [mock_model(mock_backend)], "agents": [agent("helper")], "database_url": url}
        env = {
            "MOCK_API_KEY": "mock-secret",
            "STRATA_ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        server = StrataProcess(tmp_path_factory.mktemp("lists-pg"), config, env).start()
        try:
            made = [run_as(server, server.api_key, "helper", f"q{i}") for i in range(5)]
            runs = [r["id"] for r in all_pages(server, server.api_key, "/v1/runs", limit=2)]
            assert runs == [r["id"] for r in made[::-1]]
            sessions = [s["id"] for s in all_pages(server, server.api_key, "/v1/sessions", limit=2)]
            assert sessions == [r["session_id"] for r in made[::-1]]
            deadline = time.monotonic() + 10
            traced: set[str] = set()
            while len(traced) < 5 and time.monotonic() < deadline:
                traces = all_pages(server, server.api_key, "/v1/traces", limit=2)
                traced = {run_id for t in traces for run_id in t["run_ids"]}
                time.sleep(0.2)
            assert traced == {r["id"] for r in made}
            assert len({t["trace_id"] for t in traces}) == len(traces)
            assert all(t["root"]["name"] and t["cost_usd"] >= 0 for t in traces)
        finally:
            assert server.stop() == 0
