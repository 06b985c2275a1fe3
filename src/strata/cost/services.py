"""`CostServices`: the price catalog, the usage meter and store, budgets and GPU-time shares, as the app holds
them (`AppState.cost`). `start()` builds and starts them on the app's database; `stop()` flushes usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from strata.config import StrataConfig
from strata.cost.budgets import AlertCallback, BudgetGuard, BudgetSubject, _Counters
from strata.cost.gpu_time import GpuTimeShares
from strata.cost.metering import UsageMeter
from strata.cost.prices import PriceCatalog
from strata.cost.records import UsageEvent
from strata.security.principal import Principal
from strata.store.database import Database
from strata.store.usage import UsageStore


@dataclass
class CostServices:
    catalog: PriceCatalog
    store: UsageStore
    meter: UsageMeter
    budgets: BudgetGuard
    gpu_time: GpuTimeShares = field(default_factory=GpuTimeShares)

    @classmethod
    async def start(
        cls,
        config: StrataConfig,
        db: Database,
        *,
        redis: Redis | None = None,
        on_soft_limit: AlertCallback | None = None,
        on_hard_limit: AlertCallback | None = None,
        gpu_time: GpuTimeShares | None = None,
        counters: _Counters | None = None,
    ) -> CostServices:
        """Build on a migrated database; `redis` (the app's client) shares budget counters across replicas,
        `counters` across the worker processes of one machine without Redis."""
        store = UsageStore(db)
        meter = UsageMeter.from_config(config.cost, store)
        budgets = BudgetGuard.from_config(
            config, store, redis=redis, on_soft_limit=on_soft_limit, on_hard_limit=on_hard_limit, counters=counters
        )
        await meter.start()
        return cls(
            catalog=PriceCatalog.from_config(config),
            store=store,
            meter=meter,
            budgets=budgets,
            gpu_time=gpu_time or GpuTimeShares(),
        )

    def settle(self, event: UsageEvent, who: Principal | BudgetSubject | None) -> None:
        """After a request or run step: queue its usage row and charge its cost to the budgets. Never blocks."""
        self.meter.record(event)
        if who is not None and event.cost_usd > 0:
            self.budgets.spend_soon(who, event.agent, event.cost_usd)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """After everything that may record usage has stopped: spends in flight, then every queued row."""
        await self.budgets.aclose()
        await self.meter.stop(timeout_s)
