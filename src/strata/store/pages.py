"""Keyset pages for lists that are newest first: a page ends at a (time, id) position, and the next one starts
strictly below it, so rows inserted meanwhile (all newer) never shift a page and none repeats or goes missing.

The position travels to clients as an opaque cursor: URL-safe base64 of JSON. Its contents are not a
contract; a cursor that does not decode, or that decodes to the wrong shape, is a `BadCursor`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Generic, TypeVar

import orjson

T = TypeVar("T")
MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_AT = 2**63 - 1  # positions are 64-bit, as the columns they come from


class BadCursor(ValueError):
    """A cursor this server did not hand out (or one of another list)."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the sort value of its last row (a time in microseconds or nanoseconds, an integer
    either way so no precision is lost) and that row's id, which breaks ties."""

    at: int
    id: str

    def encode(self, kind: str) -> str:
        raw = orjson.dumps([kind, self.at, self.id])
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, cursor: str, kind: str) -> Position:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            tag, at, id_ = orjson.loads(raw)
        except (binascii.Error, ValueError, TypeError):
            raise BadCursor("is not a cursor this list handed out (use next_cursor as it is)") from None
        if tag != kind or not isinstance(at, int) or isinstance(at, bool) or not isinstance(id_, str):
            raise BadCursor("is not a cursor of this list (use the next_cursor of the same list)")
        if not 0 <= at <= MAX_AT or len(id_) > 64:
            raise BadCursor("is not a cursor this list handed out (use next_cursor as it is)")
        return cls(at, id_)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next: Position | None  # None: this is the last page
