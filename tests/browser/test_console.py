"""The console (`/console`) in a real browser: Playwright driving Debian's chromium, headless, against a real
`strata serve` and the scripted mock model. Each page's screenshot is taken; with STRATA_SCREENSHOTS=1 it lands
in docs/images/console-*.png, where the README shows it (otherwise in the temporary directory, so a test run
leaves the checkout as it was)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend, Reply, ToolCallSpec
from tests.support.runs import agent, wait_status
from tests.support.strata_process import REPO_ROOT, StrataProcess

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"the console's browser tests need Debian's chromium at {CHROMIUM}", allow_module_level=True)

Page = playwright_api.Page
expect = playwright_api.expect
IMAGES = (
    REPO_ROOT / "docs" / "images"
    if os.environ.get("STRATA_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "strata-console-screenshots"
)
WAIT_MS = 10_000


@pytest.fixture(scope="module")
def starting(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[StrataProcess]]:
    """`strata serve` starts in a thread while chromium launches: the module's two slow set-ups overlap."""
    prices = {"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 2000.0}
    config = {
        "models": [mock_model(mock_backend, **prices)],
        "deploy": {"profiles": {"mock-v2": mock_model(mock_backend, **prices)}},
        "agents": [
            agent("helper", tools=["calculator"]),
            agent("approver", tools=["calculator"], require_approval=["calculator"]),
        ],
        "runs": {"lease_s": 2, "poll_s": 0.1},
        "server": {"drain_delay_s": 0, "shutdown_grace_s": 5},
        "cost": {"budgets": [{"scope": "user", "name": "*", "period": "day", "limit_usd": 500.0}]},
    }
    process = StrataProcess(tmp_path_factory.mktemp("console"), config, env={"MOCK_API_KEY": "mock-secret"})
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(process.start)
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs()


@pytest.fixture(scope="module")
def browser(starting: Future[StrataProcess]) -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def strata(starting: Future[StrataProcess], browser: Any) -> StrataProcess:
    return starting.result()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"the console's scripts failed: {errors}"


def log_in(page: Page, strata: StrataProcess, key: str) -> None:
    """Through the login form."""
    page.goto(strata.url + "/console")
    page.fill("#login input[name=key]", key)
    page.click("#login button[type=submit]")
    expect(page.locator("#who")).not_to_be_empty()


def open_console(page: Page, strata: StrataProcess, key: str, where: str = "") -> None:
    """Logged in by the login route (the context's requests share the page's cookies), straight to a page."""
    assert page.context.request.post(strata.url + "/console/login", data={"key": key}).ok
    page.goto(f"{strata.url}/console#/{where}")
    expect(page.locator("#who")).not_to_be_empty()


def screenshot(page: Page, name: str, *, full_page: bool = True) -> None:
    """The page as the README shows it; long pages (the audit trail, the API reference) by their first screen."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / f"console-{name}.png"), full_page=full_page)


def chat(strata: StrataProcess, text: str, stream: bool = False) -> None:
    body = {"model": "mock-model", "messages": [{"role": "user", "content": text}], "stream": stream}
    response = httpx.post(strata.url + "/v1/chat/completions", json=body, headers=strata.headers, timeout=10)
    assert response.status_code == 200, response.text


def test_log_in_with_a_key_kept_from_scripts_and_see_the_overview_charts_of_real_requests(
    page: Page, strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.when({}, Reply(content="charted answer", chunks=3))
    for i in range(6):
        chat(strata, f"question {i}", stream=i % 2 == 0)
    page.goto(strata.url + "/")  # the root leads to the console
    page.fill("#login input[name=key]", "sk-strata-not-a-real-key")
    page.click("#login button[type=submit]")
    expect(page.locator("#login .error")).to_have_text("That key is not valid.")
    log_in(page, strata, strata.api_key)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["strata_session"]["httpOnly"] and cookies["strata_session"]["sameSite"] == "Strict"
    assert strata.api_key not in page.evaluate("document.cookie")  # the key is out of the scripts' reach
    charts = page.locator("#charts .chart")
    expect(charts).to_have_count(5)
    expect(page.locator("#chart-requests canvas")).to_be_visible()
    rate = page.locator("[data-now=requests]").inner_text()
    assert float(rate.rsplit(" ", 1)[1]) > 0, rate
    assert re.fullmatch(r"p50 now: \d+ ms", page.locator("[data-now=latency]").inner_text())
    expect(page.locator("#spend-today .value")).not_to_have_text("$0.00")
    expect(page.locator("table").filter(has_text="mock-model").first).to_contain_text("closed")
    screenshot(page, "overview")


def test_open_a_run_with_its_tool_call_and_trace_waterfall(
    page: Page, strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("calculator", {"expression": "6*7"}, id="c1")]), Reply(content="It is 42.")
    )
    run = httpx.post(strata.url + "/v1/agents/helper/runs", json={"input": "6*7?"}, headers=strata.headers, timeout=30)
    run_id = run.json()["id"]
    wait_status(strata, run_id)
    open_console(page, strata, strata.api_key, "runs")
    page.select_option("#run-filters select[name=status]", "completed")
    page.click("#run-filters button")
    link = page.locator(f"#runs-list a[href='#/runs/{run_id}']")
    screenshot(page, "runs")
    link.click()
    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#run-output")).to_contain_text("It is 42.")
    steps = page.locator(".card").filter(has_text="Steps")
    expect(steps).to_contain_text("calculator")
    expect(steps).to_contain_text('"expression": "6*7"')
    expect(steps).to_contain_text("42")
    model_steps = steps.locator("tr").filter(has_text="mock-model")
    expect(model_steps.nth(0)).to_contain_text("$0.019")  # 11 tokens in at $1000/M, 4 out at $2000/M
    expect(model_steps.nth(1)).to_contain_text("$0.017")  # 11 in, 3 out
    bars = page.locator(".waterfall .row")
    expect(bars.first).to_be_visible()
    assert bars.count() >= 3  # the run, its model calls and its tool call
    widths = [float(re.search(r"width:([\d.]+)%", s).group(1)) for s in page.locator(".waterfall .bar").evaluate_all(
        "bars => bars.map(b => b.getAttribute('style'))")]  # fmt: skip
    assert max(widths) == pytest.approx(100, abs=1) and min(widths) < 100  # to scale: the longest spans the axis
    screenshot(page, "run")


def test_approve_a_pending_tool_call_and_watch_the_run_finish_live(
    page: Page, strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.script(
        Reply(tool_calls=[ToolCallSpec("calculator", {"expression": "2+3"}, id="c7")]),
        Reply(content="It makes five, as counted.", chunk_delay_s=0.5),
    )
    body = {"input": "2+3?", "mode": "background"}
    run_id = httpx.post(strata.url + "/v1/agents/approver/runs", json=body, headers=strata.headers, timeout=30).json()[
        "id"
    ]
    wait_status(strata, run_id, ("awaiting_approval",))
    open_console(page, strata, strata.api_key, f"runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("awaiting_approval")
    pending = page.locator(".pending[data-call=c7]")
    expect(pending).to_contain_text("calculator")
    expect(page.locator(".messages .msg.user")).to_have_text(re.compile("2\\+3\\?"))
    screenshot(page, "approval")
    pending.locator("button.approve").click()
    expect(page.locator("#run-live")).to_contain_text("It makes")  # the answer as the model writes it (2.5 s of it)
    expect(page.locator("#run-status")).to_have_text("completed")  # no reload: the run's events drive the page
    expect(page.locator("#run-output")).to_contain_text("It makes five, as counted.")
    expect(page.locator("#run-live")).to_be_hidden()
    expect(page.locator(".pending")).to_have_count(0)


def test_chat_in_the_playground_streams_with_tokens_latency_and_cost(
    page: Page, strata: StrataProcess, mock_backend: MockBackend
) -> None:
    mock_backend.when({}, Reply(content="one two three four five six", chunk_delay_s=0.1))
    open_console(page, strata, strata.api_key, "playground")
    page.select_option("select[name=target]", "model:mock-model")
    page.fill("textarea[name=message]", "count to six")
    page.click("button[type=submit]")
    answer = page.locator("#transcript .msg.assistant .answer")
    expect(answer).to_contain_text("one")
    partial = answer.inner_text()
    expect(answer).to_have_text("one two three four five six")
    assert partial != "one two three four five six"  # seen while it streamed, before the end
    expect(page.locator("#stat-tokens")).to_contain_text("11 in / 6 out")
    expect(page.locator("#stat-ttft")).to_contain_text("first token")
    expect(page.locator("#stat-cost")).to_have_text(re.compile(r"cost \$\d"))
    screenshot(page, "playground")
    page.select_option("select[name=target]", "agent:helper")  # an agent: a streamed run
    page.fill("textarea[name=message]", "count again")
    page.click("button[type=submit]")
    expect(answer).to_have_text("one two three four five six")
    expect(page.locator("#stats a")).to_have_text("open the run")
    expect(page.locator("#stat-cost")).to_have_text(re.compile(r"cost \$\d"))


def test_create_a_key_shown_once_change_its_limits_rotate_and_revoke_it(page: Page, strata: StrataProcess) -> None:
    open_console(page, strata, strata.api_key, "keys")
    page.fill("#create-key input[name=name]", "console-made")
    page.select_option("#create-key select[name=role]", "developer")
    page.fill("#create-key input[name=rpm]", "120")
    page.click("#create-key button[type=submit]")
    secret = page.locator("#new-secret").inner_text()
    assert secret.startswith("sk-strata-")
    row = page.locator("#keys-list tr").filter(has_text="console-made")
    expect(row).to_contain_text("120 req/min")
    assert httpx.get(strata.url + "/v1/me", headers={"Authorization": f"Bearer {secret}"}).json()["role"] == "developer"
    screenshot(page, "keys")
    row.get_by_role("button", name="Limits").click()
    row.locator("input").nth(1).fill("5000")  # tokens per minute
    row.get_by_role("button", name="Save").click()
    expect(row).to_contain_text("120 req/min, 5,000 tok/min")
    row.get_by_role("button", name="Rotate").click()
    rotated = page.locator("#new-secret")
    expect(rotated).not_to_have_text(secret)
    new_secret = rotated.inner_text()
    assert httpx.get(strata.url + "/v1/me", headers={"Authorization": f"Bearer {new_secret}"}).json()["tpm"] == 5000
    new_row = page.locator("#keys-list tr").filter(has_text=new_secret[:16])
    new_row.locator("button.danger").click()
    expect(new_row).to_have_count(0)  # the list shows keys in use
    assert httpx.get(strata.url + "/v1/me", headers={"Authorization": f"Bearer {new_secret}"}).status_code == 401
    old = httpx.get(strata.url + "/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert old.status_code == 200  # the rotated-from secret works through its hour of overlap


def test_every_admin_page_renders(page: Page, strata: StrataProcess, mock_backend: MockBackend) -> None:
    mock_backend.when({}, Reply(content="ok"))
    chat(strata, "for the usage page")
    open_console(page, strata, strata.api_key, "usage")
    for name, marker in [
        ("usage", "#budgets table"),
        ("audit", "#audit-verify p"),
        ("models", "table"),
        ("gpus", "h1"),
    ]:
        page.click(f"#nav a[data-page={name}]")
        expect(page.locator(marker).first).to_be_visible()
        screenshot(page, name, full_page=name != "audit")
    page.click("#nav a[data-page=audit]")
    expect(page.locator("#audit-verify")).to_contain_text("ok")
    expect(page.locator("#audit-list")).to_contain_text("console.login")
    page.click("#nav a[data-page=usage]")
    expect(page.locator("#usage-total")).to_contain_text("requests")
    budget = page.locator("#budgets tr").filter(has_text="user admin")
    expect(budget).to_contain_text("$500.00")  # the limit, what is spent and what is left
    spent = float(budget.locator("td").nth(4).inner_text().lstrip("$"))
    left = float(budget.locator("td").nth(5).inner_text().lstrip("$"))
    assert spent > 0 and left == pytest.approx(500 - spent, abs=0.01)


def test_the_gpu_page_shows_what_nvml_reports(page: Page, strata: StrataProcess) -> None:
    """This machine has no GPU (the admin pages test shows "No GPUs"): the inventory of one comes from the test."""
    gpu = {"index": 0, "uuid": "GPU-1", "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * 2**30,
           "memory_used_bytes": 20 * 2**30, "utilization_gpu_pct": 37, "temperature_c": 41, "power_w": 180.5,
           "power_limit_w": 700.0}  # fmt: skip
    inventory = {"available": True, "reason": None, "driver_version": "560.35", "cuda_version": "12.6",
                 "gpus": [gpu, {**gpu, "index": 1, "uuid": "GPU-2"}], "links": [{"a": 0, "b": 1, "kind": "NVLINK",
                 "nvlink_count": 18}], "errors": []}  # fmt: skip
    page.route("**/admin/gpus", lambda route: route.fulfill(json=inventory))
    open_console(page, strata, strata.api_key, "gpus")
    rows = page.locator("table").first.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("20.0 GiB / 80.0 GiB")
    expect(rows.first).to_contain_text("37%")
    expect(page.locator("#view")).to_contain_text("NVLINK \u00d718")


def test_an_operator_hot_swaps_a_model_to_a_configured_profile(page: Page, strata: StrataProcess) -> None:
    open_console(page, strata, strata.create_key("operator", name="console-operator"), "models")
    assert page.locator("#nav a").all_inner_texts() == ["Overview", "Runs", "Playground", "Usage", "Models", "GPUs"]
    page.fill("input[name=profile]", "mock-v2")
    page.click("form.inline button[type=submit]")
    expect(page.locator(".card").filter(has_text="Hot swap")).to_contain_text("mock-model now serves version 2")
    page.reload()
    expect(page.locator(".card").filter(has_text="Versions")).to_contain_text("profile: mock-v2")


def test_a_user_key_sees_no_admin_pages_and_its_direct_calls_are_refused(page: Page, strata: StrataProcess) -> None:
    key = strata.create_key("user", name="console-user", user="carol")
    open_console(page, strata, key)
    expect(page.locator("#who")).to_have_text("carol · user")
    nav = page.locator("#nav a").all_inner_texts()
    assert nav == ["Overview", "Runs", "Playground", "Usage"]
    expect(page.locator("#runs-active")).to_be_visible()
    expect(page.locator("#charts")).to_have_count(0)  # metrics are not the user's to read
    screenshot(page, "user")
    page.goto(f"{strata.url}/console#/keys")
    expect(page.locator("#view h1")).to_have_text("Not here")
    status = "async (path, init) => (await fetch(path, init)).status"
    assert page.evaluate(status, "/admin/keys") == 403
    assert page.evaluate(status, "/admin/audit") == 403
    csrf = page.evaluate("document.cookie.match(/strata_csrf=([^;]+)/)[1]")
    create = {"method": "POST", "headers": {"X-CSRF-Token": csrf, "Content-Type": "application/json"},
              "body": '{"name": "sneaky", "role": "admin"}'}  # fmt: skip
    assert page.evaluate("async ([p, i]) => (await fetch(p, i)).status", ["/admin/keys", create]) == 403
    no_token = {**create, "headers": {"Content-Type": "application/json"}}
    assert page.evaluate("async ([p, i]) => (await fetch(p, i)).status", ["/v1/agents/helper/runs", no_token]) == 403
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate(status, "/v1/me") == 401


def test_the_api_reference_is_served_from_the_package(page: Page, strata: StrataProcess) -> None:
    assert page.context.request.post(strata.url + "/console/login", data={"key": strata.api_key}).ok
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(strata.url + "/docs")
    expect(page.locator(".swagger-ui .title").first).to_contain_text("Strata")
    expect(page.locator(".opblock-summary-path").filter(has_text="/v1/runs").first).to_be_visible()
    assert all(url.startswith(strata.url) or url.startswith("data:") for url in requests), requests
    screenshot(page, "docs", full_page=False)


def test_assets_stay_inside_the_package_and_the_pages_run_only_their_own_scripts(strata: StrataProcess) -> None:
    for path in (
        "/console/assets/%2e%2e/routes.py",
        "/console/assets/..%2f..%2fapp.py",
        "/docs/assets/%2e%2e/__init__.py",
    ):
        refused = httpx.get(strata.url + path)
        assert refused.status_code == 404 and "no console asset" in refused.json()["error"]["message"], path
    page = httpx.get(strata.url + "/console")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert httpx.get(strata.url + "/console/assets/vendor/uplot/uPlot.iife.min.js").status_code == 200
