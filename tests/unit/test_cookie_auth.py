"""The console's session cookie: when a cookie-borne request may go on (api/cookie_auth.py)."""

from __future__ import annotations

from typing import Any

from strata.api.cookie_auth import csrf_problem, session_key


def scope(method: str = "POST", kind: str = "http", **headers: str) -> dict[str, Any]:
    raw = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return {"type": kind, "method": method, "headers": raw}


COOKIES = "strata_session=sk-strata-abc; strata_csrf=tok123"


def test_the_session_key_comes_from_the_cookie_of_http_requests_only() -> None:
    assert session_key(scope(cookie=COOKIES)) == "sk-strata-abc"
    assert session_key(scope(kind="websocket", cookie=COOKIES)) is None  # no SameSite check on a socket
    assert session_key(scope()) is None


def test_reads_pass_and_writes_need_the_token_from_this_origin() -> None:
    assert csrf_problem(scope("GET", cookie=COOKIES)) is None
    assert csrf_problem(scope(cookie=COOKIES, x_csrf_token="tok123", host="h:1", origin="http://h:1")) is None
    assert csrf_problem(scope(cookie=COOKIES, x_csrf_token="tok123")) is None  # no Origin: not a cross-site page
    assert "X-CSRF-Token".lower() in (csrf_problem(scope(cookie=COOKIES)) or "")
    assert csrf_problem(scope(cookie=COOKIES, x_csrf_token="other")) is not None
    assert csrf_problem(scope(cookie="strata_session=k", x_csrf_token="")) is not None  # no token cookie at all
    cross = scope(cookie=COOKIES, x_csrf_token="tok123", host="h:1", origin="https://evil.example")
    assert csrf_problem(cross) == "cross-origin write refused"
