"""Agent specs by name and version. Versions never change once written, so they are cached."""

from __future__ import annotations

from strata.config import AgentConfig
from strata.store.agents import AgentVersionStore
from strata.store.tables import AgentVersion


class UnknownAgent(LookupError):
    pass


class AgentCatalog:
    def __init__(self, versions: AgentVersionStore) -> None:
        self._versions = versions
        self._cache: dict[tuple[str, int], AgentConfig] = {}

    async def sync(self, agents: list[AgentConfig]) -> None:
        for agent in agents:
            await self._versions.sync_from_config(agent.name, agent.stored())

    async def latest(self, name: str) -> tuple[int, AgentConfig]:
        row = await self._versions.latest(name)
        if row is None:
            raise UnknownAgent(name)
        spec = self._cache.get((name, row.version))  # a version never changes: validated once
        if spec is None:
            spec = self._cache[(name, row.version)] = AgentConfig.model_validate(row.spec)
        return row.version, spec

    async def version(self, name: str, version: int) -> AgentConfig:
        cached = self._cache.get((name, version))
        if cached is not None:
            return cached
        row = await self._versions.get(name, version)
        if row is None:
            raise UnknownAgent(f"{name} v{version}")
        spec = self._cache[(name, version)] = AgentConfig.model_validate(row.spec)
        return spec

    async def versions(self, name: str) -> list[AgentVersion]:
        return await self._versions.versions(name)

    async def names(self) -> list[str]:
        return await self._versions.names()

    async def current(self, name: str) -> tuple[int, AgentConfig | None]:
        """The latest version and its spec; (0, None) for an agent that does not exist yet."""
        try:
            return await self.latest(name)
        except UnknownAgent:
            return 0, None

    async def put(self, spec: AgentConfig, *, after: int | None = None) -> int:
        """Publish a new version; `after`: the version it was checked against (`VersionConflict` if not the latest)."""
        row = await self._versions.add(spec.name, spec.stored(), "api", after=after)
        return row.version
