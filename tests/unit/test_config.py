"""Configuration: defaults, file + environment layering, and the exact messages users see for mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strata.config import EmbeddedModelConfig, OpenAIModelConfig
from strata.config_loader import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "strata.yaml"
    path.write_text(text)
    return path


def test_no_file_gives_the_embedded_quick_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    [model, embeddings] = config.models
    assert isinstance(model, EmbeddedModelConfig) and isinstance(embeddings, EmbeddedModelConfig)
    assert (model.name, model.model_path, model.embedding) == ("smollm2-135m", None, False)
    assert (embeddings.name, embeddings.model_path, embeddings.embedding) == ("smollm2-135m-embed", None, True)


def test_environment_overrides_the_file_including_list_entries(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server:\n  port: 9000\nmodels:\n  - kind: openai\n    name: a\n    base_url: http://gpu1:8000/v1\n",
    )
    config = load_config(
        path, {"STRATA_SERVER__PORT": "9100", "STRATA_MODELS__0__UPSTREAM_MODEL": "meta-llama/Llama-3.1-8B"}
    )
    assert config.server.port == 9100
    model = config.models[0]
    assert isinstance(model, OpenAIModelConfig)
    assert model.target_model == "meta-llama/Llama-3.1-8B"


def test_env_override_reaches_default_models_without_a_file(tmp_path: Path) -> None:
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    config = load_config(None, {"STRATA_CONFIG": "", "STRATA_MODELS__0__MODEL_PATH": str(gguf)})
    assert config.models[0].model_path == gguf  # type: ignore[union-attr]


def test_config_path_comes_from_strata_config(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 8123\n")
    assert load_config(None, {"STRATA_CONFIG": str(path)}).server.port == 8123


BAD_CONFIGS = [
    (
        "server:\n  prot: 8000\n",
        {},
        [
            "{file}:2: server.prot: unknown key 'prot'; did you mean 'port'? "
            "(allowed: host, port, drain_delay_s, shutdown_grace_s, health_interval_s, grpc_port, tls_cert_file, tls_key_file, workers, max_in_flight, "
            "max_connections, header_timeout_s, body_timeout_s)"
        ],
    ),
    (
        "server:\n  port: 99999\n",
        {},
        ["{file}:2: server.port: Input should be less than or equal to 65535 (got 99999)"],
    ),
    (
        "server:\n  port: abc\n",
        {},
        ["{file}:2: server.port: Input should be a valid integer, unable to parse string as an integer (got 'abc')"],
    ),
    (
        "models:\n  - kind: openai\n    name: x\n",
        {},
        ["{file}:2: models[0]: give either 'base_url' (one endpoint) or 'deployments' (replicas), not both or neither"],
    ),
    (
        "models:\n  - kind: tgi\n    name: x\n",
        {},
        ["{file}:2: models[0].kind: unknown model kind 'tgi'; expected 'embedded', 'openai' or 'vllm'"],
    ),
    (
        "models:\n  - name: x\n    base_url: http://h\n",
        {},
        ["{file}:2: models[0]: each model needs a 'kind': 'embedded', 'openai' or 'vllm'"],
    ),
    ("models: []\n", {}, ["{file}:1: models: at least one model must be configured"]),
    (
        "models:\n  - kind: embedded\n    model_path: /nope.gguf\n",
        {},
        ["{file}:3: models[0].model_path: no such file: /nope.gguf"],
    ),
    (
        "models:\n  - kind: openai\n    name: a\n    base_url: ftp://x\n",
        {},
        ["{file}:4: models[0].base_url: must be an http:// or https:// URL, got 'ftp://x'"],
    ),
    (
        "models:\n  - {kind: openai, name: a, base_url: 'http://x'}\n  - {kind: openai, name: a, base_url: 'http://y'}\n",
        {},
        ["{file}:1: models: model name 'a' is configured twice"],
    ),
    (
        "models:\n  - kind: openai\n    name: a\n    base_url: http://x\n    api_key_env: NOPE_KEY\n",
        {},
        ["{file}:5: models[0].api_key_env: environment variable NOPE_KEY is not set"],
    ),
    ("server: [1\n", {}, ["{file}:2: invalid YAML: expected ',' or ']', but got '<stream end>'"]),
    ("- 1\n- 2\n", {}, ["{file}:1: the top level must be a mapping of keys to values"]),
    (
        "logging:\n  level: loud\n",
        {},
        ["{file}:2: logging.level: Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')"],
    ),
    (
        "models:\n  - kind: openai\n    name: a\n    base_url: http://x\n    timeouts:\n      read_s: -1\n",
        {},
        ["{file}:6: models[0].timeouts.read_s: Input should be greater than 0 (got -1)"],
    ),
    (
        "server:\n  port: 8000\n",
        {"STRATA_SERVER__PORT": "eighty", "STRATA_MODELS__3__N_CTX": "5", "STRATA_SERVRE__HOST": "x"},
        [
            "environment variable STRATA_MODELS__3__N_CTX: models[3].n_ctx: "
            "index 3 is out of range: models has 2 entries",
            "environment variable STRATA_SERVER__PORT: server.port: Input should be a valid integer, "
            "unable to parse string as an integer (got 'eighty')",
            "environment variable STRATA_SERVRE__HOST: servre: unknown key 'servre'; did you mean 'server'? "
            "(allowed: server, models, data_dir, redis_url, database_url, routes, deploy, tools, agents, runs, compute, logging, "
            "tracing, security, limits, cost, alerts)",
        ],
    ),
]


@pytest.mark.parametrize(("text", "environ", "expected"), BAD_CONFIGS)
def test_bad_config_messages(tmp_path: Path, text: str, environ: dict[str, str], expected: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)
    assert [str(issue) for issue in caught.value.issues] == [line.format(file=path) for line in expected]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml", {})
    assert str(caught.value) == f"{tmp_path / 'absent.yaml'}: config file not found"


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_config_check_prints_ok_and_masks_nothing_it_should_show(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n  - kind: openai\n    name: cloud\n    base_url: https://api.example.com/v1\n"
        "    api_key_env: EXAMPLE_KEY\n",
    )
    result = run_cli(
        "config",
        "check",
        "--config",
        str(path),
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "EXAMPLE_KEY": "sk-very-secret-value"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok\n")
    assert "base_url: https://api.example.com/v1" in result.stdout
    assert "api_key_env: EXAMPLE_KEY" in result.stdout
    assert "sk-very-secret-value" not in result.stdout  # the key itself never appears


def test_config_check_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 0\nlogging:\n  format: xml\n")
    result = run_cli("config", "check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"invalid configuration ({path}):",
        f"  {path}:2: server.port: Input should be greater than or equal to 1 (got 0)",
        f"  {path}:4: logging.format: Input should be 'auto', 'json' or 'console' (got 'xml')",
    ]


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "strata.example.yaml"
    config = load_config(example, {"VLLM_API_KEY": "k"})
    assert [m.name for m in config.models] == ["smollm2-135m", "smollm2-135m-embed", "llama-3.1-8b"]
    # Every default the example documents is the real default.
    defaults = load_config(None, {"STRATA_CONFIG": ""})
    assert config.server == defaults.server
    assert config.logging == defaults.logging
    assert config.tracing == defaults.tracing
    assert config.models[:2] == defaults.models
    assert config.tools == defaults.tools
    assert config.runs == defaults.runs
    assert config.compute == defaults.compute
    assert config.agents == defaults.agents
    assert config.security == defaults.security
    assert config.limits == defaults.limits
    assert config.cost == defaults.cost
    assert config.alerts == defaults.alerts
    assert config.deploy == defaults.deploy


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    import sqlite3

    path = write(tmp_path, f"data_dir: {tmp_path / 'data'}\n")
    result = run_cli("db", "upgrade", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "database is up to date" in result.stdout
    tables = {
        row[0] for row in sqlite3.connect(tmp_path / "data" / "strata.db").execute("select name from sqlite_master")
    }
    assert {"runs", "steps", "events", "sessions", "messages", "agent_versions", "alembic_version"} <= tables


def test_config_check_masks_credentials(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "database_url: postgresql+asyncpg://strata:hunter2@db.internal/strata\n"
        "redis_url: redis://:s3cret@cache:6379/0\n"
        "models:\n  - kind: vllm\n    name: q\n    model: Qwen/Qwen2.5-7B-Instruct\n"
        "    env: {HF_TOKEN: hf_abcdef, HF_HOME: /models/hf}\n",
    )
    # A shared database needs a shared encryption key, or `config check` reports it as a refusal.
    env = {**os.environ, "STRATA_ENCRYPTION_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}
    result = run_cli("config", "check", "--config", str(path), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for secret in ("hunter2", "s3cret", "hf_abcdef"):
        assert secret not in result.stdout
    assert "postgresql+asyncpg://strata:********@db.internal/strata" in result.stdout
    assert "HF_HOME: /models/hf" in result.stdout  # what is not secret stays readable


def test_strata_url_is_for_the_cli_not_the_config(tmp_path: Path) -> None:
    assert load_config(None, {"STRATA_URL": "http://10.0.0.5:8000", "STRATA_CONFIG": ""}).server.port == 8000
