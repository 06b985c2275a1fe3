from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ast_guard
from tests.support.mock_backend import MockBackend
from tests.support.strata_process import StrataProcess

ast_guard.install()  # before any test runs: a failure report must never crash the session (see ast_guard)


@pytest.fixture(scope="module")
def mock_backend() -> Iterator[MockBackend]:
    with MockBackend(api_key="mock-secret") as mock:
        yield mock


@pytest.fixture(autouse=True)
def _fresh_mock(request: pytest.FixtureRequest) -> None:
    if "mock_backend" in request.fixturenames:
        request.getfixturevalue("mock_backend").reset()


def mock_model(mock: MockBackend, name: str = "mock-model", **extra: object) -> dict[str, object]:
    return {
        "kind": "openai",
        "name": name,
        "base_url": mock.url,
        "upstream_model": "upstream-" + name,
        "api_key_env": "MOCK_API_KEY",
        # Error-path tests fail on purpose again and again: keep the breaker out of their way.
        "breaker": {"consecutive_failures": 10_000, "failure_rate": 1.0, "min_requests": 10_000},
        **extra,
    }


@pytest.fixture(scope="module")
def strata(mock_backend: MockBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataProcess]:
    """One `strata serve` per test module, in front of the mock backend."""
    workdir: Path = tmp_path_factory.mktemp("strata")
    config = {
        "models": [
            mock_model(mock_backend),
            mock_model(mock_backend, "mock-fast-timeout", timeouts={"read_s": 1.0, "total_s": 2.0}),
            {"kind": "openai", "name": "nowhere", "base_url": "http://127.0.0.1:9/v1"},
        ],
        "server": {"health_interval_s": 0.5, "drain_delay_s": 0, "shutdown_grace_s": 5},
    }
    process = StrataProcess(workdir, config, env={"MOCK_API_KEY": "mock-secret"}).start()
    yield process
    assert process.stop() == 0
    assert '"unhandled error"' not in process.logs(), "a request hit an unexpected exception"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first: those with `slow` or `image` tests, then those that start servers, the unit tests last.
    `make test` hands whole files to parallel workers in collection order (`--no-loadscope-reorder`: xdist
    would otherwise order files by their number of tests, and a one-test file of three minutes started
    last ran alone at the end); started first, the long files overlap everything else, and the many short
    unit files fill the workers' gaps at the end."""
    long_files = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("image")}
    unit = Path(__file__).parent / "unit"
    items.sort(key=lambda item: (item.path not in long_files, unit in item.path.parents))  # stable sort
