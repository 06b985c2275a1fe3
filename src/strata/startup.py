"""What `strata serve` checks before it loads a model, creates an admin key or listens.

Each refusal is one sentence for the operator (`StartupRefused`); the CLI prints it and exits non-zero.
The checks that need no running service are also what `strata config check` reports.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from strata.config import StrataConfig
from strata.security.admin_key import admin_key_problem
from strata.security.encryption import EncryptionError, check_keyring

if TYPE_CHECKING:
    from strata.api.state import Lifecycle

SERVICE_TIMEOUT_S = 5.0
STARTUP_FAILED = 3  # the exit status when the start fails after these checks passed (uvicorn's own)


class StartupRefused(Exception):
    """Strata will not start; the message says why and what to change."""


def config_problems(config: StrataConfig, environ: Mapping[str, str]) -> list[str]:
    """Everything wrong that can be seen without starting anything (and without creating any file)."""
    problems = []
    if problem := admin_key_problem(environ):
        problems.append(problem)
    for path in filter(None, (config.server.tls_cert_file, config.server.tls_key_file)):
        if not path.is_file():
            problems.append(f"TLS file {path} does not exist")
    try:
        check_keyring(config, environ)
    except EncryptionError as exc:
        problems.append(str(exc))
    return problems


def preflight(config: StrataConfig, environ: Mapping[str, str]) -> None:
    """Raise StartupRefused for the first problem: the config, the port, then the services it needs."""
    if problems := config_problems(config, environ):
        raise StartupRefused(problems[0])
    check_port(config.server.host, config.server.port)
    if config.server.grpc_port is not None:
        check_port(config.server.host, config.server.grpc_port, "server.grpc_port")
    asyncio.run(_check_services(config))


def check_port(host: str, port: int, setting: str = "--port or server.port") -> None:
    """Bind the address as uvicorn will, and let it go: a taken port is found before anything is created."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT leftovers do not count
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupRefused(
                    f"{host}:{port} is already in use (another Strata?): stop it, or choose another port with {setting}"
                ) from None
            if exc.errno == errno.EACCES:
                raise StartupRefused(f"cannot listen on {host}:{port}: permission denied") from None
            raise StartupRefused(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def _check_services(config: StrataConfig) -> None:
    url = make_url(config.effective_database_url)
    if url.get_backend_name() == "sqlite":
        _check_sqlite_dir(url.database)
    else:
        await _check_database(config.effective_database_url)
    if config.redis_url:
        await _check_redis(config.redis_url)


def _check_sqlite_dir(database: str | None) -> None:
    """The data directory exists and is writable, or can be made: checked without making it."""
    if not database or database == ":memory:":
        return
    directory = os.path.dirname(os.path.abspath(database))
    existing = directory
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write to the data directory" if existing == directory else f"create the data directory {directory} in"
        raise StartupRefused(f"cannot {what} {existing} (data_dir): permission denied")


async def _check_database(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError
    from sqlalchemy.ext.asyncio import create_async_engine

    shown = make_url(url).render_as_string(hide_password=True)
    engine = create_async_engine(url, connect_args=_connect_timeout(url))
    try:
        async with asyncio.timeout(SERVICE_TIMEOUT_S), engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        text_reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        raise StartupRefused(f"cannot connect to the database {shown} (database_url): {text_reason}") from None
    finally:
        await engine.dispose()


def _connect_timeout(url: str) -> dict[str, float]:
    return {"timeout": SERVICE_TIMEOUT_S} if make_url(url).get_backend_name() == "postgresql" else {}


async def _check_redis(url: str) -> None:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_connect_timeout=SERVICE_TIMEOUT_S, socket_timeout=SERVICE_TIMEOUT_S)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        shown = re.sub(r"//[^@/]*@", "//***@", url)
        raise StartupRefused(f"cannot reach Redis at {shown} (redis_url): {exc}") from None
    finally:
        await client.aclose()


def describe_failure(exc: BaseException) -> str:
    """One line for an exception that stopped the start: the driver's own words for database errors."""
    from sqlalchemy.exc import DBAPIError

    reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(reason).strip().splitlines()
    return f"{type(reason).__name__}: {lines[0]}" if lines else type(reason).__name__


@contextmanager
def quiet_startup_failure(lifecycle: Lifecycle) -> Iterator[None]:
    """uvicorn reports a failed lifespan start-up with the whole traceback and exits 3; say it in one line
    instead (the traceback is logged at debug level by the app). Other exits pass through untouched."""
    muffle = _WhileStartupFailed(lifecycle)
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(muffle)
    try:
        yield
    except SystemExit:
        if lifecycle.startup_error is None:
            raise
        sys.stderr.write(f"cannot start: {lifecycle.startup_error}\n")
        raise SystemExit(STARTUP_FAILED) from None
    finally:
        uvicorn_log.removeFilter(muffle)


class _WhileStartupFailed(logging.Filter):
    def __init__(self, lifecycle: Lifecycle) -> None:
        super().__init__()
        self._lifecycle = lifecycle

    def filter(self, record: logging.LogRecord) -> bool:
        return self._lifecycle.startup_error is None or record.levelno < logging.ERROR
