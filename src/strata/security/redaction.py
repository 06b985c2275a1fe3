"""Masks secrets in text that leaves the process: log lines and error bodies.

Strata's own key format and bearer tokens are recognised by shape; secrets Strata knows by value
(the admin key, the encryption keys, upstream API keys from the environment) are masked wherever they
appear; operators add their own patterns (`security.redact_patterns`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

MASK = "[REDACTED]"
_SHAPES = (
    r"sk-strata-[0-9A-Za-z]{20,}",  # Strata API keys (a prefix alone, as lists show it, stays readable)
    r"(?<=[Bb]earer )[A-Za-z0-9._~+/=-]{8,}",  # the credential after "Bearer "
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
)
SECRET_ENV = ("STRATA_ADMIN_KEY", "STRATA_ENCRYPTION_KEY", "STRATA_ENCRYPTION_OLD_KEYS", "STRATA_API_KEY")
_MIN_SECRET = 8  # shorter "secrets" would mask ordinary words


class Redactor:
    def __init__(self, patterns: Iterable[str] = (), secrets: Iterable[str] = ()) -> None:
        literal = sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True)
        # Operators' patterns are compiled on their own: they may carry flags such as (?i).
        self._patterns = [re.compile("|".join(f"(?:{p})" for p in (*_SHAPES, *(re.escape(s) for s in literal))))]
        self._patterns.extend(re.compile(p) for p in patterns)

    @classmethod
    def from_environ(
        cls, patterns: Iterable[str], environ: Mapping[str, str], extra_env: Iterable[str] = ()
    ) -> Redactor:
        """Secrets by value: Strata's own, and the env vars named by the config (upstream API keys)."""
        values: list[str] = []
        for name in (*SECRET_ENV, *extra_env):
            value = environ.get(name)
            if value:
                values.extend(part.strip() for part in value.split(",") if part.strip())
        return cls(patterns, values)

    def text(self, value: str) -> str:
        for pattern in self._patterns:
            value = pattern.sub(MASK, value)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def processor(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """A structlog processor: every string in the event, nested ones too."""
        for key, value in event.items():
            event[key] = self.value(value)
        return event


def upstream_key_envs(models: Iterable[Any]) -> list[str]:
    """Names of the env vars holding upstream API keys, from the configured models."""
    names: list[str] = []
    for model in models:
        names.extend(filter(None, [getattr(model, "api_key_env", None)]))
        for endpoint in getattr(model, "deployments", None) or ():
            names.extend(filter(None, [getattr(endpoint, "api_key_env", None)]))
    return names
