"""Every scenario `python -m bench` can run, in the order a full run runs them.

Phase-1 scenarios (overhead, throughput, streaming) live in `bench.scenarios` and `bench.report` renders them;
each later one is a module of its own with `NAME`, `run`, `rows`, `section` and `METHOD`, and renders itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from bench import agent_steps, cold_start, embedded_model, litellm_peer, overload, scenarios, workers
from bench.scenarios import Settings
from bench.servers import BenchServers

Log = Callable[[str], None]
Row = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class Scenario:
    name: str
    # (servers, settings, log, the results of the scenarios that ran before it in this run) -> its result
    run: Callable[[BenchServers, Settings, Log, dict[str, Any]], dict[str, Any]]
    module: ModuleType | None = None  # a self-rendering scenario module; None: rendered by bench.report

    def rows(self, results: dict[str, Any]) -> list[Row]:
        return self.module.rows(results) if self.module is not None else []

    def section(self, results: dict[str, Any]) -> list[str]:
        return self.module.section(results) if self.module is not None else []

    @property
    def method(self) -> Sequence[str]:
        return self.module.METHOD if self.module is not None else ()


def _core(name: str) -> Scenario:
    function = scenarios.SCENARIOS[name]
    return Scenario(name, lambda servers, s, log, _so_far: function(servers, s, log))


def _module(module: ModuleType) -> Scenario:
    return Scenario(module.NAME, lambda servers, s, log, _so_far: module.run(servers, s, log), module)


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        _core("overhead"),
        _core("throughput"),
        _module(litellm_peer),
        _core("streaming"),
        _module(agent_steps),
        Scenario(overload.NAME, lambda servers, s, log, so_far: overload.run(servers, s, log, so_far), overload),
        _module(workers),
        _module(embedded_model),
        _module(cold_start),
    )
}
