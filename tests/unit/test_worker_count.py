"""How many worker processes `strata serve` runs by default: the machine's cores (at most 4), one left to an
embedded model, never fewer than one; `server.workers` overrides."""

from __future__ import annotations

import pytest

from strata import workers
from strata.config import StrataConfig

REMOTE = {"models": [{"kind": "openai", "name": "m", "base_url": "http://127.0.0.1:9/v1"}]}


@pytest.mark.parametrize(
    ("cores", "config", "expected"),
    [
        (2, {}, 1),  # the default config runs the embedded model here: it keeps a core
        (8, {}, 3),
        (1, {}, 1),
        (2, REMOTE, 2),
        (16, REMOTE, 4),
        (16, {**REMOTE, "server": {"workers": 7}}, 7),
    ],
)
def test_worker_count(monkeypatch: pytest.MonkeyPatch, cores: int, config: dict[str, object], expected: int) -> None:
    monkeypatch.setattr(workers, "usable_cores", lambda: cores)
    assert workers.worker_count(StrataConfig.model_validate(config)) == expected
