"""The route/permission matrix: every route of the app, every role.

No credentials -> 401; a role without the route's permission -> 403; a role with it -> neither.
The routes come from the app itself, so a new route is covered the day it is added — and a route
that declares no permission stops the app from being built at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from strata.api.permissions import PUBLIC, ROUTE_PERMISSIONS, UndeclaredRoute, app_routes, route_policies
from strata.app import build_app
from strata.config import StrataConfig
from strata.security.rbac import ROLE_PERMISSIONS, ROLES
from tests.conftest import mock_model
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

PARAMS = {
    "agent": "demo",
    "name": "demo",
    "run_id": "run_x",
    "response_id": "resp_x",
    "session_id": "ses_x",
    "key_id": "key_x",
    "trace_id": "0" * 32,
    "model_id": "mock-model",
    "path": "style.css",  # /console/assets/{path} (and /docs/assets/{path}: a 404 there is still not a 401)
}


def _config(mock: MockBackend) -> dict[str, object]:
    return {
        "models": [mock_model(mock)],
        "server": {"health_interval_s": 0.5, "drain_delay_s": 0, "shutdown_grace_s": 2},
    }


@pytest.fixture(scope="module")
def server(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    process = StrataProcess(tmp_path_factory.mktemp("routes"), _config(mock_backend), {"MOCK_API_KEY": "mock-secret"})
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def role_keys(server: StrataProcess) -> dict[str, str]:
    return {role: server.create_key(role, name=f"matrix-{role}") for role in ROLES}


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """The routes of an app built like the server's (nothing is started: building is enough)."""
    model = {"kind": "openai", "name": "mock-model", "base_url": "http://127.0.0.1:9/v1"}
    config = StrataConfig.model_validate({"models": [model], "data_dir": str(tmp_path_factory.mktemp("app"))})
    app = build_app(config)
    return sorted((method, info.path) for info in app_routes(app) for method in info.methods)


def _url(path: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path).format(**PARAMS)  # {model_id:path}: a converter


def _call(client: httpx.Client, method: str, path: str) -> int:
    if method == "WS":
        return _websocket_status(client, path)
    # An empty JSON object: routes that validate it answer 400 or 422, which still shows the way in was open.
    response = client.request(method, _url(path), json={} if method in ("POST", "PUT", "PATCH") else None)
    return response.status_code


def _websocket_status(client: httpx.Client, path: str) -> int:
    """The handshake's answer: 101 when the socket opened, else the HTTP status it was refused with."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = str(client.base_url).replace("http://", "ws://").rstrip("/") + _url(path)
    headers = {k: v for k, v in client.headers.items() if k.lower() == "authorization"}
    try:
        with connect(url, additional_headers=headers, open_timeout=5):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_every_route_is_declared_and_every_declaration_is_a_route(routes: list[tuple[str, str]]) -> None:
    assert set(routes) == set(ROUTE_PERMISSIONS)


def test_a_route_without_a_declared_permission_stops_the_app() -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    extra = APIRouter()

    @extra.get("/v1/brand-new")
    async def brand_new() -> dict[str, str]:
        return {}

    app.include_router(extra)
    with pytest.raises(UndeclaredRoute, match="GET /v1/brand-new declares no permission"):
        route_policies(app, public_metrics=False)
    with pytest.raises(UndeclaredRoute, match="not a FastAPI route"):  # e.g. FastAPI's own open /openapi.json
        route_policies(FastAPI(), public_metrics=False)


def test_no_credentials_get_401_everywhere_but_the_public_routes(
    server: StrataProcess, routes: list[tuple[str, str]]
) -> None:
    anonymous = httpx.Client(base_url=server.url, timeout=10)
    wrong = httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": "Bearer sk-strata-nope"})
    for method, path in routes:
        public = ROUTE_PERMISSIONS[(method, path)] is PUBLIC
        for client in (anonymous, wrong):
            status = _call(client, method, path)
            if public:
                assert status not in (401, 403), f"{method} {path} is public, got {status}"
            else:
                assert status == 401, f"{method} {path} without valid credentials answered {status}"
    assert anonymous.get("/no/such/route").status_code == 401  # nothing answers anonymous callers, not even 404


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_exactly_its_permissions(
    role: str, server: StrataProcess, role_keys: dict[str, str], routes: list[tuple[str, str]]
) -> None:
    client = server.client(role_keys[role], timeout=30)
    for method, path in routes:
        permission = ROUTE_PERMISSIONS[(method, path)]
        if permission is PUBLIC or (method, path) == ("POST", "/admin/reload"):
            continue  # reload is exercised below, once, not per role
        status = _call(client, method, path)
        if permission in ROLE_PERMISSIONS[role]:
            assert status not in (401, 403), f"{role} may {permission} but {method} {path} answered {status}"
        else:
            assert status == 403, f"{role} lacks {permission} but {method} {path} answered {status}"


def test_operator_may_reload_and_user_may_not(server: StrataProcess, role_keys: dict[str, str]) -> None:
    denied = server.client(role_keys["user"]).post("/admin/reload")
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"
    assert "config:write" in denied.json()["error"]["message"]
    assert server.client(role_keys["operator"]).post("/admin/reload").status_code == 200


def test_401_has_openai_error_shape_and_challenge(server: StrataProcess) -> None:
    response = httpx.post(server.base_url + "/chat/completions", json={}, headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["request_id"] == "abc-123"
    assert "Authorization: Bearer" in error["message"]


def test_me_reports_the_callers_identity(server: StrataProcess) -> None:
    key = server.create_key("developer", name="dev-me", user="dana", models=["mock-model"], rpm=100)
    me = server.client(key).get("/v1/me").json()
    assert me | {"key_id": None} == {
        "user": "dana",
        "role": "developer",
        "via": "key",
        "key_id": None,
        "name": "dev-me",
        "models": ["mock-model"],
        "agents": None,
        "rpm": 100,
        "tpm": None,
        "budget_usd": None,
        "permissions": [
            "models:invoke",
            "models:read",
            "agents:invoke",
            "agents:read",
            "agents:write",
            "runs:read",
            "api:schema",
        ],  # what the console offers this key
    }


def test_public_metrics_is_a_config_choice(mock_backend: MockBackend, tmp_path: Path) -> None:
    config = {**_config(mock_backend), "security": {"public_metrics": True}}
    process = StrataProcess(tmp_path, config, {"MOCK_API_KEY": "mock-secret"}).start()
    try:
        assert httpx.get(process.url + "/metrics").status_code == 200
        assert httpx.get(process.base_url + "/models").status_code == 401
    finally:
        process.stop()
