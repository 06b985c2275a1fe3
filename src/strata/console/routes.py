"""The console's pages and assets, logging in and out, and `/docs` (Swagger UI from the swagger-ui-bundle package).

The pages are static files (plain JavaScript modules, uPlot vendored under static/vendor): they hold no data and
take no credentials; everything they show comes from the API, through the session cookie that `POST
/console/login` sets (see api/cookie_auth.py), under the same route permissions as any client.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import orjson
import swagger_ui_bundle
from fastapi import APIRouter, Request
from starlette.responses import FileResponse, RedirectResponse, Response

from strata.api.auth import PRINCIPAL, audit, authenticate
from strata.api.cookie_auth import CSRF_COOKIE, SESSION_COOKIE, same_origin
from strata.api.errors import ApiError
from strata.security.rbac import Permission

STATIC = Path(__file__).parent / "static"
SWAGGER = Path(swagger_ui_bundle.swagger_ui_path)
MAX_KEY_CHARS = 4096
# The pages run only their own files: no inline script, nothing from elsewhere, never framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/console", status_code=307)


@router.get("/console")
async def console() -> Response:
    return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)


@router.get("/console/assets/{path:path}")
async def console_asset(path: str) -> Response:
    return _file(STATIC, path)


@router.post("/console/login")
async def login(request: Request) -> Response:
    """Body `{"key": "sk-strata-..."}`: a valid key becomes the session cookie; answers who it is."""
    if not same_origin(request.scope):
        raise ApiError(403, "cross-origin login refused", type_="permission_error", code="csrf_failed")
    key = _key(await request.body())
    who = await authenticate(request.app.state.strata.guard, request.scope, key)
    request.scope[PRINCIPAL] = who
    audit(request, "console.login", f"role {who.role}")
    body = {"user": who.user, "role": who.role, "permissions": [p.value for p in Permission if who.may(p)]}
    response = Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})
    secure = request.url.scheme == "https"
    response.set_cookie(SESSION_COOKIE, key, httponly=True, samesite="strict", secure=secure, path="/")
    # Readable by the console's scripts, which repeat it in X-CSRF-Token: a page elsewhere can do neither.
    response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(32), samesite="strict", secure=secure, path="/")
    return response


@router.post("/console/logout")
async def logout() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    response.delete_cookie(CSRF_COOKIE, path="/", samesite="strict")
    return response


@docs_router.get("/docs")
async def docs() -> Response:
    return FileResponse(STATIC / "docs.html", headers=_PAGE_HEADERS)


@docs_router.get("/docs/assets/{path:path}")
async def docs_asset(path: str) -> Response:
    return _file(SWAGGER, path)


def _key(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    key = body.get("key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_CHARS:
        raise ApiError(400, 'the body is {"key": "<an API key>"}', param="key")
    return key.strip()


def _file(root: Path, path: str) -> Response:
    """A file under `root`; 404 for anything else (.., links out, folders)."""
    target = (root / path).resolve()
    if not target.is_relative_to(root.resolve()) or not target.is_file():
        raise ApiError(404, f"no console asset {path!r}", type_="not_found_error", code="not_found")
    return FileResponse(target, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
