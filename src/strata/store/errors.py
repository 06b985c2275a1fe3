"""Telling a value the database refuses from a database that is away.

A refused value (a NUL character on PostgreSQL, a lone surrogate, a number out of range) fails the same way
however often it is sent: retrying cannot help, and whoever sent it is answered 400 or the row is set aside.
Anything else (connection lost, lock timeout, a missing table) may pass on a later try.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError

_DATA_EXCEPTION_CLASS = "22"  # SQLSTATE class 22, "data exception": bad encoding, out of range, bad escape


def is_data_error(exc: BaseException) -> bool:
    """The database (or its driver, encoding the value) refused a value, anywhere in the cause chain.

    asyncpg's errors reach SQLAlchemy as a plain `DBAPIError`, not `DataError`: their SQLSTATE tells."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DataError | UnicodeError):
            return True
        for candidate in (seen, getattr(seen, "orig", None)):
            if str(getattr(candidate, "sqlstate", "") or "").startswith(_DATA_EXCEPTION_CLASS):
                return True
        seen = seen.__cause__
    return False
