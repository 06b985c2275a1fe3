"""Strings no database can store are refused at the edge, with 400 naming the field.

PostgreSQL's text and JSONB refuse the NUL character (U+0000), and no UTF-8 encoder takes a lone surrogate
(U+D800..U+DFFF outside a pair, which JSON's `\\u` escapes can spell). Let through, one such string reached
the usage, audit and span writers, or a run's rows, and failed there instead of here. So every route refuses
them first: `refuse_bad_strings`, a dependency of every route, checks the path and query parameters and a
JSON body; the chat fast path and the WebSocket route call `bad_json_string` on theirs. Headers need nothing:
the HTTP parser refuses a NUL in a header, and header values are read as Latin-1, which has no surrogates.

In JSON text, both can only arrive as escapes (a raw NUL or surrogate byte is not valid JSON, and the parsers
refuse it). A body without a backslash costs one memchr; an ordinary body with escapes costs one
regular-expression search of its bytes, from the first backslash, for a `\\u0000` escape or a
`\\ud800`-`\\udfff` escape outside a pair (about as long as orjson takes to parse it); only a body where
one occurs is parsed once more and walked to name the field. The chat route, whose parser (orjson) refuses lone
surrogates itself, searches only for NUL escapes on its way (`has_nul_escape`), and names a lone surrogate's
field only when orjson has refused the body.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocketException, status
from starlette.requests import HTTPConnection, Request

from strata.api.errors import ApiError
from strata.config_loader import format_path

# A NUL escape, a high surrogate escape not followed by a low one, or a low one not preceded by a high one. It
# starts with a literal `\u`, so the regex engine skips ahead to each backslash-u quickly. An escaped backslash
# before a `u` (the text `\\u0000`) matches too; the walk then finds nothing.
_SUSPECT_ESCAPE = re.compile(
    rb"\\u(?:0000|[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u)[dD][c-fC-F])"
)
_NUL_ESCAPE = re.compile(rb"\\u0000")
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True)
class BadString:
    param: str | None  # the field as users write it: messages[0].content, input, run_id
    character: str

    @property
    def message(self) -> str:
        what = (
            "a NUL character (\\u0000)"
            if self.character == "\x00"
            else f"a lone surrogate (\\u{ord(self.character):04x}), which is not valid Unicode"
        )
        return f"{self.param or 'the request body'}: contains {what}; it cannot be stored"

    def error(self) -> ApiError:
        return ApiError(400, self.message, code="unstorable_value", param=self.param)


def bad_text(value: str, param: str | None) -> BadString | None:
    match = _BAD_CHARACTER.search(value)
    return BadString(param, match.group()) if match else None


def bad_json_string(body: bytes | str) -> BadString | None:
    """The first string (value or key) of a JSON document holding a NUL or a lone surrogate; None when there is
    none, or when the document is not JSON (its route's parser says so)."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    first = raw.find(b"\\")  # memchr: a body without a single escape costs next to nothing
    if first < 0 or not _SUSPECT_ESCAPE.search(raw, first):
        return None
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return _walk(document)


def has_nul_escape(body: bytes) -> bool:
    """Whether a JSON body may hold a NUL character (then `bad_json_string` tells where)."""
    first = body.find(b"\\")
    return first >= 0 and _NUL_ESCAPE.search(body, first) is not None


def _walk(document: Any) -> BadString | None:
    """Depth first, in document order, without recursion: a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if found := bad_text(value, format_path(path) or None):
                return found
        elif isinstance(value, dict):
            for key in value:
                if found := bad_text(key, format_path((*path, key))):
                    return found
            stack.extend(((*path, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in reversed(list(enumerate(value))))
    return None


async def refuse_bad_strings(connection: HTTPConnection) -> None:
    """Every route's dependency (after `authorize`): 400 for a NUL or a lone surrogate in a path or query
    parameter or a JSON body; a WebSocket is closed with 1008 instead."""
    found = _bad_parameter(connection)
    if found is None and isinstance(connection, Request) and connection.method in _WITH_BODY:
        found = bad_json_string(await connection.body())  # read once: the route is given the same bytes
    if found is None:
        return
    if connection.scope["type"] == "websocket":
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason=found.message[:120])
    raise found.error()


def _bad_parameter(connection: HTTPConnection) -> BadString | None:
    for name, value in connection.path_params.items():
        if isinstance(value, str) and (found := bad_text(value, name)):
            return found
    if connection.scope.get("query_string"):
        for name, value in connection.query_params.multi_items():
            if found := bad_text(name, "query") or bad_text(value, name):
                return found
    return None
