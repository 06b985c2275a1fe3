"""Assemble the agent runtime (store, tools, engine, worker) and take it down again."""

from __future__ import annotations

from dataclasses import dataclass

from strata.agents.bus import EventBus
from strata.agents.catalog import AgentCatalog
from strata.agents.durable.entrypoint import load_entrypoint
from strata.agents.engine import RunEngine
from strata.agents.model_call import ModelCaller
from strata.agents.service import AgentService
from strata.agents.tools.registry import ToolRegistry
from strata.agents.worker import RunWorker
from strata.compute.offload import CpuPool
from strata.config import StrataConfig
from strata.cost.prices import PriceCatalog
from strata.cost.run_accounting import RunAccounting
from strata.security.encryption import Keyring
from strata.security.redaction import Redactor
from strata.serving.chat import ChatService
from strata.store.agents import AgentVersionStore
from strata.store.database import Database
from strata.store.idempotency import hash_plaintext_keys
from strata.store.runs import RunStore


@dataclass
class AgentRuntime:
    db: Database
    store: RunStore
    bus: EventBus
    catalog: AgentCatalog
    tools: ToolRegistry
    engine: RunEngine
    worker: RunWorker
    service: AgentService

    @classmethod
    async def start(
        cls,
        config: StrataConfig,
        chat: ChatService,
        cpu: CpuPool,
        *,
        keyring: Keyring | None = None,
        redactor: Redactor | None = None,
        migrate: bool = True,
    ) -> AgentRuntime:
        """`migrate` False: the database is migrated already (by the supervisor of `server.workers`)."""
        db = Database(config.effective_database_url, keyring=keyring, redactor=redactor)
        if migrate:
            await db.upgrade()
        await hash_plaintext_keys(db)  # idempotency keys stored in plain by an older version
        bus = EventBus()
        store = RunStore(db, bus.publish_stored)
        catalog = AgentCatalog(AgentVersionStore(db))
        await catalog.sync(config.agents)
        tools = await ToolRegistry.from_config(config.tools, cpu)
        for agent in config.agents:  # a code agent that cannot be imported stops the start, as a bad tool path does
            if agent.entrypoint:
                load_entrypoint(agent.entrypoint)
        accounting = RunAccounting(PriceCatalog.from_config(config))
        runs = config.runs
        engine = RunEngine(store, catalog, tools, ModelCaller(chat), bus, accounting, runs.lease_s)
        worker = RunWorker(
            store, engine, concurrency=runs.workers, lease_s=runs.lease_s, poll_s=runs.poll_s, serves=chat.models
        )
        engine.wake_workers = worker.wake  # a parent queued again when its children ended
        worker.start()
        return cls(db, store, bus, catalog, tools, engine, worker, AgentService(store, catalog, worker, bus))

    async def stop(self) -> None:
        """Stops running work; the database stays open (others may still write) until `close()`."""
        await self.worker.stop()
        await self.tools.close()

    async def close(self) -> None:
        await self.store.close()
        await self.db.dispose()
