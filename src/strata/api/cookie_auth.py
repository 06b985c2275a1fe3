"""The console's session cookie as a credential, and what keeps a cookie-borne write from being forged.

`POST /console/login` checks an API key and puts it in an HttpOnly, SameSite=Strict cookie (Secure under TLS):
the browser sends it, the console's JavaScript never sees it, and a revoked key stops working at once, as it
does in a header. Requests carrying the cookie go through the same authentication and route permissions as
any other. A write (any method but GET, HEAD, OPTIONS) authenticated by the cookie must also carry the CSRF
token (double submit: the `strata_csrf` cookie, readable by the console's own pages only, repeated in the
`X-CSRF-Token` header) and, when the browser names an Origin, come from this host. An explicit
`Authorization` or `X-API-Key` header always wins over the cookie: API clients are unaffected.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.requests import cookie_parser
from starlette.types import Scope

SESSION_COOKIE = "strata_session"
CSRF_COOKIE = "strata_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def cookies(scope: Scope) -> dict[str, str]:
    raw = header(scope, b"cookie")
    return cookie_parser(raw) if raw else {}


def session_key(scope: Scope) -> str | None:
    """The API key of the console session, for HTTP requests (never a WebSocket: no SameSite check applies)."""
    if scope["type"] != "http":
        return None
    return cookies(scope).get(SESSION_COOKIE) or None


def same_origin(scope: Scope) -> bool:
    """No Origin header (not a browser's cross-site request), or one naming this host."""
    origin = header(scope, b"origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == (header(scope, b"host") or "").lower()


def csrf_problem(scope: Scope) -> str | None:
    """Why a cookie-authenticated request may not go on, or None."""
    if scope["method"] in SAFE_METHODS:
        return None
    if not same_origin(scope):
        return "cross-origin write refused"
    expected = cookies(scope).get(CSRF_COOKIE, "")
    sent = header(scope, CSRF_HEADER.encode()) or ""
    if not expected or not hmac.compare_digest(expected.encode(), sent.encode()):
        return f"a write with the console's session needs the {CSRF_HEADER} header (the {CSRF_COOKIE} cookie)"
    return None
