"""`GET /v1/usage` on a small app: validation answers 400 with a clear message, callers without
usage:read_all see only their own usage, reports include what was just recorded; the budget 429's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from strata.api import usage_routes
from strata.api.auth import PRINCIPAL
from strata.api.errors import error_response, install_error_handlers
from strata.config import StrataConfig
from strata.cost.budgets import BudgetDecision, BudgetGuard
from strata.cost.records import UsageEvent
from strata.cost.services import CostServices
from strata.security.principal import Principal
from strata.store.database import Database
from tests.support.databases import sqlite_url

NOW = datetime.now(UTC)


class FakeAuth:
    """Stands in for AuthMiddleware: the caller is named by headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            scope[PRINCIPAL] = Principal(
                user=headers.get(b"x-user", b"alice").decode(),
                role=headers.get(b"x-role", b"user").decode(),  # type: ignore[arg-type]
                via="key",
                key_id="key_" + headers.get(b"x-user", b"alice").decode(),
            )
        await self.app(scope, receive, send)


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[CostServices]:
    with sqlite_url(tmp_path) as url:
        db = Database(url)
        await db.upgrade()
        cost = await CostServices.start(StrataConfig(), db)
        yield cost
        await cost.stop()
        await db.dispose()


@pytest.fixture
async def client(services: CostServices) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.state.strata = SimpleNamespace(cost=services)
    app.include_router(usage_routes.router)
    install_error_handlers(app)
    app.add_middleware(FakeAuth)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


def event(user: str, cost: float, *, model: str = "m", minutes_ago: int = 0, agent: str | None = None) -> UsageEvent:
    return UsageEvent(
        ts=NOW - timedelta(minutes=minutes_ago),
        request_id=f"req-{user}-{cost}",
        kind="run_step" if agent else "chat",
        model=model,
        key_id=f"key_{user}",
        user=user,
        agent=agent,
        prompt_tokens=100,
        completion_tokens=10,
        latency_s=0.5,
        cost_usd=cost,
    )


async def get(client: httpx.AsyncClient, params: dict[str, str], **headers: str) -> httpx.Response:
    return await client.get("/v1/usage", params=params, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def test_users_see_their_own_usage_and_admins_everyones(
    client: httpx.AsyncClient, services: CostServices
) -> None:
    for e in (event("alice", 0.25), event("alice", 0.5, model="gpt"), event("bob", 2.0, agent="demo")):
        services.settle(e, None)  # queued: the route flushes before it reads
    mine = (await get(client, {"group_by": "model"})).json()
    assert [(row["group"], row["requests"], row["cost_usd"]) for row in mine["data"]] == [
        ("gpt", 1, 0.5),
        ("m", 1, 0.25),
    ]
    assert mine["user"] == "alice"
    assert mine["total"]["requests"] == 2 and mine["total"]["total_tokens"] == 220
    everyone = (await get(client, {"group_by": "user"}, x_role="admin", x_user="root")).json()
    assert {row["group"]: row["cost_usd"] for row in everyone["data"]} == {"bob": 2.0, "alice": 0.75}
    assert everyone["total"]["cost_usd"] == pytest.approx(2.75)
    bobs = (await get(client, {"group_by": "agent", "user": "bob"}, x_role="auditor")).json()
    assert [(row["group"], row["requests"]) for row in bobs["data"]] == [("demo", 1)]
    refused = await get(client, {"user": "bob"})
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == "you may read only your own usage"
    assert (await get(client, {"user": "alice"})).status_code == 200


async def test_windows(client: httpx.AsyncClient, services: CostServices) -> None:
    services.settle(event("alice", 1.0, minutes_ago=60 * 24 * 3), None)
    services.settle(event("alice", 0.1), None)
    today = NOW.date().isoformat()
    body = (await get(client, {"group_by": "day", "from": (NOW - timedelta(days=5)).date().isoformat()})).json()
    assert sum(row["requests"] for row in body["data"]) == 2
    body = (await get(client, {"group_by": "day", "from": today, "to": today})).json()  # a date: the whole day
    assert [row["group"] for row in body["data"]] == [today]
    assert body["from"] == f"{today}T00:00:00Z"
    body = (await get(client, {"group_by": "key", "from": (NOW - timedelta(hours=1)).isoformat()})).json()
    assert body["data"][0]["group"] == "key_alice" and body["total"]["requests"] == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"group_by": "team"}, "group_by: Input should be 'key', 'user', 'agent', 'model' or 'day'"),
        ({"from": "yesterday"}, "from: 'yesterday' is not an ISO date (2026-11-01) or date-time"),
        ({"from": "2026-11-10", "to": "2026-11-01"}, "'from' (2026-11-10T00:00:00Z) must be before 'to'"),
        ({"to": "9999-12-31"}, "'from' and 'to' must lie between the years 1 and 9999 in UTC"),
        ({"limit": "0"}, "limit: Input should be greater than or equal to 1"),
        ({"kind": "embedding"}, "kind: Input should be 'chat', 'embeddings', 'completions' or 'run_step'"),
    ],
)
async def test_bad_queries_are_400_with_a_clear_message(
    client: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    response = await get(client, params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(message), response.json()


async def test_not_ready_without_cost_services() -> None:
    app = FastAPI()
    app.state.strata = SimpleNamespace(cost=None)
    app.include_router(usage_routes.router)
    install_error_handlers(app)
    app.add_middleware(FakeAuth)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.get("/v1/usage")
    assert response.status_code == 503 and "Retry-After" in response.headers


async def test_budget_refusal_is_a_429_naming_the_budget() -> None:
    from strata.config import BudgetConfig

    guard = BudgetGuard(
        [BudgetConfig(scope="user", name="alice", period="day", limit_usd=1.0)],
        None,
        clock=lambda: datetime(2026, 11, 15, 23, 0, tzinfo=UTC),
    )
    who = Principal(user="alice", role="user", via="key", key_id="key_alice")
    await guard.spend(who, None, 1.5)
    decision: BudgetDecision = await guard.check(who)
    response = error_response(usage_routes.budget_refusal(decision))
    body: dict[str, Any] = orjson.loads(bytes(response.body))["error"]
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3600"
    assert body["type"] == "insufficient_quota" and body["code"] == "budget_exceeded"
    assert body["message"] == "budget exceeded: user alice spent $1.50 of $1.00 this day; resets 2026-11-16T00:00:00Z"
    assert body["budget"] == {
        "scope": "user",
        "name": "alice",
        "period": "day",
        "limit_usd": 1.0,
        "spent_usd": 1.5,
        "resets_at": "2026-11-16T00:00:00Z",
    }
    await guard.aclose()


def test_the_cli_prints_the_same_report(tmp_path: Path) -> None:
    import asyncio

    import yaml
    from typer.testing import CliRunner

    from strata.cli_usage import usage_app
    from strata.store.usage import UsageStore

    (tmp_path / "strata.yaml").write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    config = StrataConfig.model_validate({"data_dir": tmp_path / "data"})

    async def seed() -> None:
        db = Database(config.effective_database_url)
        await db.upgrade()
        await UsageStore(db).append([event("alice", 0.25), event("alice", 0.5, model="gpt"), event("bob", 2.0)])
        await db.dispose()

    asyncio.run(seed())
    runner = CliRunner()
    args = ["--config", str(tmp_path / "strata.yaml")]
    result = runner.invoke(usage_app, [*args, "--group-by", "user", "--json"])
    assert result.exit_code == 0, result.output
    body = orjson.loads(result.stdout)
    assert {row["group"]: row["cost_usd"] for row in body["data"]} == {"bob": 2.0, "alice": 0.75}
    assert body["total"]["requests"] == 3
    table = runner.invoke(usage_app, [*args, "--group-by", "model"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    for text in ("usage by model", "gpt", "$2.25", "500 ms", "total"):
        assert text in table.stdout, table.stdout
    bad = runner.invoke(usage_app, [*args, "--group-by", "team"])
    assert bad.exit_code == 2
    assert "--group-by: Input should be 'key', 'user', 'agent', 'model' or 'day'" in bad.output
