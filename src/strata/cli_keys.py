"""`strata keys ...`: manage API keys straight in the database (the machine's operator is trusted),
and rotate the encryption key. The admin API (`/admin/keys`) does the same over HTTP."""

from __future__ import annotations

import asyncio
import getpass
import os
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from strata.cli_exit import ExitCode
from strata.cli_support import keyring_or_exit, load_or_exit, on_database, require_database
from strata.config import StrataConfig

keys_app = typer.Typer(no_args_is_help=True, help="API keys and the encryption key.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Path to strata.yaml.")]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `12h`, `30d`, `2w`."""
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration such as 90s, 15m, 12h, 30d or 2w")
    return timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])


def parse_expiry(text: str | None) -> datetime | None:
    if text is None:
        return None
    if _DURATION.match(text.strip()):
        return datetime.now(UTC) + parse_duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a duration (30d) nor an ISO date (2027-01-31)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _csv(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _with_store(config: StrataConfig, work: Callable[..., Awaitable[T]]) -> T:
    from strata.store.audit import AuditStore
    from strata.store.keys import KeyStore

    require_database(config, "manage keys")  # before the keyring: say where the database is missing
    keyring = keyring_or_exit(config)  # the audit rows it writes are signed with a key derived from it
    return on_database(
        config,
        lambda db: work(KeyStore(db), AuditStore(db)),
        what="manage keys",
        table="api_keys",
        upgrade=True,
        keyring=keyring,
    )


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _audit(action: str, resource: str, details: dict[str, object]) -> object:
    from strata.security.audit import AuditRecord

    return AuditRecord(action=action, outcome="success", actor=_actor(), resource=resource, details=details)


async def _broadcast_forget(config: StrataConfig, key_id: str) -> None:
    """Replicas drop the key from their caches at once; without Redis, within security.key_cache_ttl_s."""
    if not config.redis_url:
        return
    from redis.asyncio import Redis

    from strata.security.authenticator import REVOKED_CHANNEL

    redis = Redis.from_url(config.redis_url)
    try:
        await redis.publish(REVOKED_CHANNEL, key_id)
    finally:
        await redis.aclose()


def _show_secret(key_id: str, secret: str) -> None:
    out.print(f"[bold]{key_id}[/]  (shown once; store it now)", highlight=False)
    out.print(secret, style="bold green", highlight=False, soft_wrap=True)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="A name to tell the key apart.")],
    role: Annotated[str, typer.Option(help="admin, operator, developer, user or auditor.")] = "user",
    user: Annotated[str | None, typer.Option(help="Owner of its runs and usage; default: the name.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated models it may call; default: all.")] = None,
    agents: Annotated[str | None, typer.Option(help="Comma-separated agents it may run; default: all.")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    budget_usd: Annotated[float | None, typer.Option(min=0.0, help="Spending budget in USD.")] = None,
    expires: Annotated[str | None, typer.Option(help="30d, 12h, ... or an ISO date.")] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print its secret (the only time it is shown)."""
    from strata.security.rbac import ROLES
    from strata.store.keys import KeySpec

    if role not in ROLES:
        raise typer.BadParameter(f"{role!r} is not a role ({', '.join(ROLES)})", param_hint="--role")
    if budget_usd is not None and budget_usd <= 0:
        raise typer.BadParameter("a budget must be above 0 (omit it for none)", param_hint="--budget-usd")
    loaded = load_or_exit(config)
    spec = KeySpec(
        name=name,
        role=role,
        user=user,
        models=_csv(models),
        agents=_csv(agents),
        rpm=rpm,
        tpm=tpm,
        budget_usd=budget_usd,
        expires_at=parse_expiry(expires),
    )

    async def work(keys, audit):  # type: ignore[no-untyped-def]
        key, secret = await keys.create(spec, created_by=_actor())
        await audit.append([_audit("key.created", f"key {key.id}", {"name": name, "role": role, "user": key.user})])
        return key.id, secret

    key_id, secret = _with_store(loaded, work)
    _show_secret(key_id, secret)


@keys_app.command("list")
def list_keys(
    include_revoked: Annotated[bool, typer.Option("--all", help="Also revoked keys.")] = False,
    config: ConfigOption = None,
) -> None:
    """API keys: id, prefix, role, limits, expiry (never the secrets)."""
    loaded = load_or_exit(config)

    async def work(keys, _audit):  # type: ignore[no-untyped-def]
        return await keys.list(include_revoked=include_revoked)

    now = datetime.now(UTC)
    table = Table("name", "user", "role", "limits", "expires", "state")
    table.add_column("id", no_wrap=True)  # ids are copied into other commands: never break them
    table.add_column("prefix", no_wrap=True)
    for key in _with_store(loaded, work):
        limits = ", ".join(
            f"{label} {value}" for label, value in (("rpm", key.rpm), ("tpm", key.tpm), ("$", key.budget_usd)) if value
        )
        state = "revoked" if key.revoked_at else ("active" if key.active(now) else "expired")
        expires = key.expires_at.strftime("%Y-%m-%d %H:%M") if key.expires_at else "-"
        cells = (key.name, key.user, key.role, limits or "-", expires, state, key.id, key.prefix + "…")
        table.add_row(*(Text(str(cell or "")) for cell in cells))  # names are text, not markup
    out.print(table)


@keys_app.command("rotate")
def rotate(
    key_id: Annotated[str, typer.Argument(help="The key to replace.")],
    overlap: Annotated[str, typer.Option(help="How long the old key keeps working: 1h, 1d, ...")] = "1h",
    config: ConfigOption = None,
) -> None:
    """A new secret with the same grants; the old key expires after the overlap window."""
    from strata.store.keys import KeyNotFound

    loaded = load_or_exit(config)
    window = parse_duration(overlap)

    async def work(keys, audit):  # type: ignore[no-untyped-def]
        key, secret = await keys.rotate(key_id, window, created_by=_actor())
        details = {"new_key": key.id, "overlap_s": window.total_seconds()}
        await audit.append([_audit("key.rotated", f"key {key_id}", details)])
        await _broadcast_forget(loaded, key_id)
        return key.id, secret

    try:
        new_id, secret = _with_store(loaded, work)
    except KeyNotFound as exc:
        err.print(Text(str(exc), style="red"), highlight=False)
        raise typer.Exit(ExitCode.NOT_FOUND) from None
    _show_secret(new_id, secret)
    out.print(Text(f"{key_id} keeps working for {overlap}"), highlight=False)


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key to revoke.")], config: ConfigOption = None) -> None:
    """Revoke a key. With Redis configured every replica drops it at once."""
    from strata.store.keys import KeyNotFound

    loaded = load_or_exit(config)

    async def work(keys, audit):  # type: ignore[no-untyped-def]
        key = await keys.revoke(key_id)
        await audit.append([_audit("key.revoked", f"key {key_id}", {"name": key.name})])
        await _broadcast_forget(loaded, key_id)

    try:
        _with_store(loaded, work)
    except KeyNotFound as exc:
        err.print(Text(str(exc), style="red"), highlight=False)
        raise typer.Exit(ExitCode.NOT_FOUND) from None
    out.print(Text(f"revoked {key_id}"), highlight=False)


@keys_app.command("generate")
def generate() -> None:
    """Print a new random key (for STRATA_ADMIN_KEY); nothing is stored."""
    from strata.security.api_keys import generate_key

    out.print(generate_key(), highlight=False)


@keys_app.command("rotate-encryption")
def rotate_encryption_key(config: ConfigOption = None) -> None:
    """New encryption key (in the key file), then re-encrypt every stored message, tool call and prompt."""
    from strata.store.reencrypt import rotate_encryption

    loaded = load_or_exit(config)
    with out.status("re-encrypting stored data..."):
        report = asyncio.run(rotate_encryption(loaded, os.environ))
    if not report.rotated_file:
        out.print("keys come from STRATA_ENCRYPTION_KEY: re-encrypted with it (no key file to rotate)")
    table = Table("table", "rows scanned", "rows re-encrypted")
    for name, count in report.reencrypted.tables.items():
        table.add_row(name, str(count.scanned), str(count.rewritten))
    out.print(table)
    retired = ", ".join(sorted(report.retired_kids)) or "none"
    out.print(f"now sealing with key {report.reencrypted.kid} (retired: {retired}); restart servers to seal with it")
    if report.retired_kids:
        out.print("keep the retired keys: the audit rows they signed are verified with them", highlight=False)
