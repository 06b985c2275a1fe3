"""Load `StrataConfig` from `strata.yaml` plus `STRATA_*` environment overrides.

Written here rather than with pydantic-settings because a user fixing a bad config needs to know
*where* the bad value came from (file and line, or which environment variable), and overrides must
reach into lists (`STRATA_MODELS__0__MODEL_PATH`); pydantic-settings merges sources anonymously and
cannot index lists.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from strata.config import StrataConfig

ENV_PREFIX = "STRATA_"
CONFIG_PATH_ENV = "STRATA_CONFIG"
# STRATA_* variables that are not config values: where the config is, the CLI's server address and key,
# and secrets that must never land in the config tree (it is printed by `strata config check`).
NOT_CONFIG = frozenset(
    {
        CONFIG_PATH_ENV,
        "STRATA_URL",
        "STRATA_API_KEY",
        "STRATA_ADMIN_KEY",
        "STRATA_ENCRYPTION_KEY",
        "STRATA_ENCRYPTION_OLD_KEYS",
    }
)
DEFAULT_CONFIG_FILE = Path("strata.yaml")
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem, phrased for the person editing the file or the environment."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.source}: {where}{self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


@dataclass
class _Sources:
    """Where each key path's value came from."""

    file: Path | None = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    env: dict[KeyPath, str] = field(default_factory=dict)

    def describe(self, path: KeyPath) -> str:
        if path not in self.lines:  # a key the environment created, e.g. a misspelt section
            below = [name for key, name in self.env.items() if key[: len(path)] == path]
            if below:
                return f"environment variable {below[0]}"
        for end in range(len(path), -1, -1):
            prefix = path[:end]
            if prefix in self.env:
                return f"environment variable {self.env[prefix]}"
            if prefix in self.lines and self.file is not None:
                return f"{self.file}:{self.lines[prefix]}"
        return str(self.file) if self.file else "built-in defaults"


def format_path(path: KeyPath) -> str:
    """('models', 0, 'name') -> 'models[0].name': how users write a key path (config and API errors)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def resolve_config_path(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """`--config` wins, then `STRATA_CONFIG`, then `./strata.yaml` if present; else defaults only."""
    if explicit is not None:
        return explicit
    if environ.get(CONFIG_PATH_ENV):
        return Path(environ[CONFIG_PATH_ENV])
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> StrataConfig:
    environ = os.environ if environ is None else environ
    sources = _Sources(file=resolve_config_path(path, environ))
    data = _read_file(sources) if sources.file else {}
    issues = _apply_env(data, environ, sources)
    try:
        config = StrataConfig.model_validate(data, context={"environ": environ})
    except ValidationError as exc:
        issues += [_issue_from_error(err, data, sources) for err in exc.errors()]
    if issues:
        raise ConfigError(issues)
    return config


def _read_file(sources: _Sources) -> dict[str, Any]:
    file = sources.file
    assert file is not None
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(str(file), "", "config file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(str(file), "", f"cannot read config file: {exc}")]) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(where, "", f"invalid YAML: {problem}")]) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(f"{file}:1", "", "the top level must be a mapping of keys to values")])
    _record_lines(node, (), sources.lines)
    return data


def _record_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _record_lines(value_node, (*path, key_node.value), lines)
            lines[(*path, key_node.value)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*path, index), lines)


def _env_value(raw: str) -> Any:
    """JSON when it parses (numbers, booleans, lists, objects), else the plain string."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str], sources: _Sources) -> list[ConfigIssue]:
    defaults = StrataConfig().model_dump(mode="json")
    issues: list[ConfigIssue] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG:
            continue
        parts: list[str | int] = [int(p) if p.isdigit() else p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        path = tuple(parts)
        if any(p == "" for p in parts):
            issues.append(ConfigIssue(f"environment variable {name}", "", "empty key segment"))
            continue
        problem = _set_path(data, defaults, path, _env_value(environ[name]))
        if problem:
            issues.append(ConfigIssue(f"environment variable {name}", format_path(path), problem))
        else:
            sources.env[path] = name
    return issues


def _set_path(data: Any, defaults: Any, path: KeyPath, value: Any) -> str | None:
    """Set `value` at `path`; missing containers come from the defaults, so overrides need no file."""
    cur, dflt = data, defaults
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(cur, list):
            if not isinstance(part, int):
                return f"{format_path(path[:depth])} is a list: use a numeric index, not {part!r}"
            if part >= len(cur):
                return f"index {part} is out of range: {format_path(path[:depth])} has {len(cur)} entries"
        elif isinstance(cur, dict):
            if isinstance(part, int):
                return f"{format_path(path[:depth]) or 'the top level'} is a mapping, not a list"
        else:
            return f"{format_path(path[:depth])} is a single value and has no key {part!r}"
        if last:
            cur[part] = value
            return None
        nxt_default = _child(dflt, part)
        if isinstance(cur, dict) and part not in cur:
            cur[part] = _copy(nxt_default) if isinstance(nxt_default, dict | list) else {}
        cur, dflt = cur[part], nxt_default
    return None


def _child(container: Any, part: str | int) -> Any:
    if isinstance(container, dict):
        return container.get(part)
    if isinstance(container, list) and isinstance(part, int) and part < len(container):
        return container[part]
    return None


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def _data_path(loc: tuple[str | int, ...], data: Any) -> KeyPath:
    """Map pydantic's error location onto the user's data, dropping union tags and validator names."""
    out: list[str | int] = []
    cur = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if (isinstance(cur, list) and isinstance(part, int) and part < len(cur)) or (
            isinstance(cur, dict) and part in cur
        ):
            out.append(part)
            cur = cur[part]
        elif last and not (isinstance(cur, dict) and part == cur.get("kind")):  # a union's tag is no key
            out.append(part)
    return tuple(out)


def _issue_from_error(err: Any, data: Any, sources: _Sources) -> ConfigIssue:
    path = _data_path(tuple(err["loc"]), data)
    kind = err["type"]
    message = err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(path[:-1], data)
        hint = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        message = f"unknown key {path[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        if allowed:
            message += f" (allowed: {', '.join(allowed)})"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "union_tag_invalid":
        message = f"unknown model kind {err['input'].get('kind')!r}; expected 'embedded', 'openai' or 'vllm'"
        path = (*path, "kind") if path and path[-1] != "kind" else path
    elif kind == "union_tag_not_found":
        message = "each model needs a 'kind': 'embedded', 'openai' or 'vllm'"
    elif "input" in err and isinstance(err["input"], str | int | float | bool) and kind != "value_error":
        message += f" (got {err['input']!r})"
    return ConfigIssue(sources.describe(path), format_path(path), message)


def _allowed_keys(path: KeyPath, data: Any) -> list[str]:
    """Field names of the config section at `path`, resolving list items and the model-kind union."""
    from strata.config import EmbeddedModelConfig, OpenAIModelConfig, TritonModelConfig, VllmModelConfig

    model: type[BaseModel] | None = StrataConfig
    cur = data
    for part in path:
        cur = _child(cur, part)
        if isinstance(part, int):  # an entry of the models list: its kind picks the schema
            kind = cur.get("kind") if isinstance(cur, dict) else None
            kinds = {"openai": OpenAIModelConfig, "vllm": VllmModelConfig, "triton": TritonModelConfig}
            model = kinds.get(str(kind), EmbeddedModelConfig)
            continue
        field_info = model.model_fields.get(part) if model else None
        annotation = field_info.annotation if field_info else None
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_model else None
    return list(model.model_fields) if model else []


_SECRET_NAME = re.compile(r"(token|key|secret|password|passwd|credential)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]*:)[^@/\s]+(?P<at>@)", re.IGNORECASE)


def redacted(config: StrataConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets masked, for `strata config check`."""

    def mask(value: Any, key: str = "") -> Any:
        if isinstance(value, SecretStr):
            return "********"
        if isinstance(value, dict) and key == "env":  # environments handed to launched servers
            return {k: "********" if _SECRET_NAME.search(str(k)) else mask(v) for k, v in value.items()}
        if isinstance(value, dict):
            return {k: mask(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v, key) for v in value]
        if isinstance(value, str):
            return _URL_PASSWORD.sub(r"\g<head>********\g<at>", value)
        return value

    dumped = mask(config.model_dump(mode="python"))
    return orjson.loads(orjson.dumps(dumped, default=str))
