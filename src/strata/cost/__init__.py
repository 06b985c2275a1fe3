"""Cost control: a price catalog, per-request cost, usage metering (a batched writer), and budgets.

- `prices`: `PriceCatalog` turns tokens (API models) and busy time (self-hosted models) into USD.
- `gpu_time`: `GpuTimeShares`, each request's share of its deployment's busy time.
- `records`: `UsageEvent`, one request or run step; `UsageRow`, one group of `GET /v1/usage`.
- `metering`: `UsageMeter`, the background writer of usage rows (never a database trip per request).
- `budgets`: `BudgetGuard`, per key / user / agent, per day / month, hard (429) or soft (an alert).
- `services`: `CostServices`, all of the above as the app holds them.
"""
