"""Column types that mask credentials on their way into the database: a key pasted as a model name or
into a URL must not end up in a usage row or a run's status reason.

The masking is the `Redactor` attached to the engine's dialect (`Database(redactor=...)`: the shapes of
Strata keys, bearer tokens and JWTs, plus the configured secrets), or the shapes alone. Values are masked
when written, and so are values compared with the column in a query, so a filter still finds what it
names. Nothing is unmasked on the way out: the secret is gone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import TypeDecorator

from strata.security.redaction import Redactor

_REDACTOR_ATTR = "strata_redactor"
SHAPES = Redactor()


def attach_redactor(engine: AsyncEngine, redactor: Redactor) -> None:
    setattr(engine.sync_engine.dialect, _REDACTOR_ATTR, redactor)


def dialect_redactor(dialect: Dialect) -> Redactor:
    return getattr(dialect, _REDACTOR_ATTR, None) or SHAPES


class RedactedString(TypeDecorator[str]):
    """A short string (a model name): credentials masked when written, cut to the column's width if the
    mask made it longer (it is longer than a short configured secret)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if not isinstance(value, str):
            return value
        masked = dialect_redactor(dialect).text(value)
        width = getattr(self.impl, "length", None)
        return masked[:width] if width and masked != value else masked


class RedactedText(TypeDecorator[str]):
    """Free text (a run's status reason): credentials masked when written."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return dialect_redactor(dialect).text(value) if isinstance(value, str) else value
