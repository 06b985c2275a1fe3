"""Prometheus metrics of the requests Strata serves: traffic, latency, tokens, cost, agents and tools.

`RequestMetrics` owns its metric objects and registers them on the registry it is given (the app's,
never the process-global `REGISTRY`), so several apps in one process stay apart. Callers record
through its methods; every label value is bounded: route templates (never raw paths), configured
model, agent and tool names, API key ids, status codes and small fixed vocabularies. User text and
run ids never become labels.

GenAI metrics follow the OpenTelemetry semantic conventions, mapped to Prometheus the way the
OpenTelemetry Prometheus exporter maps them (dots become underscores, the unit becomes a suffix):
`gen_ai.client.token.usage` -> `gen_ai_client_token_usage` (a histogram of tokens per operation,
label `gen_ai_token_type` = `input` | `output`), `gen_ai.client.operation.duration` ->
`gen_ai_client_operation_duration_seconds`; attributes `gen_ai.operation.name` and
`gen_ai.request.model` become the labels `gen_ai_operation_name` and `gen_ai_request_model`.
Tokens per second: `rate(gen_ai_client_token_usage_sum{gen_ai_token_type="output"}[5m])`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

# Whole requests: sub-millisecond health checks up to long streams and synchronous agent runs.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# First token: tens of milliseconds (small model, warm cache) to tens of seconds (long prompts, queueing).
# 2.0 is the TTFT SLO's threshold in deploy/prometheus/alerts.yml: keep it a bucket bound.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0)
# Time per output token (decode step): ~5 ms on a fast GPU to seconds on an overloaded CPU.
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
# Strata's own time per request: it should stay well under a millisecond.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# The bucket boundaries the OpenTelemetry GenAI conventions recommend.
GEN_AI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# Agent runs: a one-step answer in a second to long tool-using runs.
RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

OTHER = "other"  # the label value of anything outside a bounded vocabulary
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_MAX_CACHED = 10_000  # request label sets cached for the hot path (they are bounded anyway)


class RequestMetrics:
    """Strata's request-level metrics, registered on `registry`.

    `is_known_model(name)` says whether a model name may become a label (e.g.
    `lambda name: name in router.models`); without it, the first `max_models` distinct names are
    kept. Either way any other name is recorded as `other`: the model comes from the request body.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        is_known_model: Callable[[str], bool] | None = None,
        max_models: int = 64,
    ) -> None:
        self._is_known_model = is_known_model
        self._max_models = max_models
        self._models: set[str] = set()
        self._request_children: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "strata_requests",
            "HTTP requests answered, by route template, method, model and status code.",
            ["route", "method", "model", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "strata_request_duration_seconds",
            "Time from a request's arrival to the end of its response body (streams included).",
            ["route", "method", "model", "status"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "strata_time_to_first_token_seconds",
            "Streaming chat completions: time from the request's arrival to the first chunk sent on.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "strata_time_per_output_token_seconds",
            "Streaming chat completions: (last chunk - first chunk) / (completion tokens - 1).",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "strata_overhead_seconds",
            "Strata's own time before a response starts: elapsed time minus time waiting on the backend.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per model operation (OpenTelemetry gen_ai.client.token.usage).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=GEN_AI_TOKEN_BUCKETS,
            registry=registry,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of model operations (OpenTelemetry gen_ai.client.operation.duration).",
            ["gen_ai_operation_name", "gen_ai_request_model", "error_type"],
            buckets=GEN_AI_DURATION_BUCKETS,
            registry=registry,
        )
        self.stream_errors = Counter(
            "strata_stream_errors",
            "Streamed chat completions that failed after their response started (status 200 already sent; "
            "the client got an error event and no [DONE]), by requested model and error type.",
            ["model", "error_type"],
            registry=registry,
        )
        self.cost = Counter(
            "strata_cost_usd",
            "Cost of model usage in US dollars, by model and API key id.",
            ["model", "key"],
            registry=registry,
        )
        self.rate_limit_rejections = Counter(
            "strata_rate_limit_rejections",
            "Requests refused with 429 by a rate limit, by kind (requests or tokens per minute).",
            ["kind"],
            registry=registry,
        )
        self.shed_requests = Counter(
            "strata_shed_requests",
            "Requests refused with 503 at once because server.max_in_flight were in progress.",
            registry=registry,
        )
        self.budget_rejections = Counter(
            "strata_budget_rejections",
            "Requests refused because a budget was spent, by the budget's scope.",
            ["scope"],
            registry=registry,
        )
        self.agent_runs = Counter(
            "strata_agent_runs",
            "Agent runs that ended, by agent and final status.",
            ["agent", "status"],
            registry=registry,
        )
        self.agent_run_duration = Histogram(
            "strata_agent_run_duration_seconds",
            "Wall time of agent runs from creation to their final status.",
            ["agent", "status"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.tool_calls = Counter(
            "strata_tool_calls",
            "Tool calls made by agents, by tool and outcome.",
            ["tool", "outcome"],
            registry=registry,
        )

    # -- labels ---------------------------------------------------------------------------------

    def model_label(self, model: str | None) -> str:
        """The label for a requested model name: "" for none, the name when known, else `other`."""
        if not model:
            return ""
        if model in self._models:
            return model
        if self._is_known_model is not None:
            known = self._is_known_model(model)
        else:
            known = len(self._models) < self._max_models
        if not known:
            return OTHER
        if len(self._models) < _MAX_CACHED:
            self._models.add(model)
        return model

    # -- HTTP requests (the metrics middleware) -------------------------------------------------

    def observe_request(self, route: str, method: str, model: str | None, status: int, duration_s: float) -> None:
        """One answered request. `route` must be a route template (or `unmatched`), never a raw path."""
        if method not in _METHODS:
            method = OTHER
        label = self.model_label(model)
        key = (route, method, label, status)
        children = self._request_children.get(key)
        if children is None:
            values = (route, method, label, str(status))
            children = (self.requests.labels(*values), self.request_duration.labels(*values))
            if len(self._request_children) < _MAX_CACHED:
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(duration_s)

    def observe_overhead(self, route: str, seconds: float) -> None:
        self.overhead.labels(route).observe(max(0.0, seconds))

    # -- model calls (chat route, agent model steps) --------------------------------------------

    def observe_ttft(self, model: str | None, seconds: float) -> None:
        self.ttft.labels(self.model_label(model)).observe(seconds)

    def observe_tpot(self, model: str | None, seconds_per_token: float) -> None:
        self.tpot.labels(self.model_label(model)).observe(seconds_per_token)

    def observe_tokens(
        self, model: str | None, input_tokens: int, output_tokens: int, *, operation: str = "chat"
    ) -> None:
        """Tokens of one model operation (a chat completion, an agent's model step)."""
        label = self.model_label(model)
        self.token_usage.labels(operation, label, "input").observe(input_tokens)
        self.token_usage.labels(operation, label, "output").observe(output_tokens)

    def observe_operation(
        self, model: str | None, duration_s: float, *, error_type: str = "", operation: str = "chat"
    ) -> None:
        """Duration of one model operation; `error_type` is a bounded code (e.g. "upstream_timeout")."""
        self.operation_duration.labels(operation, self.model_label(model), error_type).observe(duration_s)

    def stream_failed(self, model: str | None, error_type: str) -> None:
        """A stream cut short after its 200 went out; `error_type` is a bounded code (e.g. "upstream_timeout")."""
        self.stream_errors.labels(self.model_label(model), error_type).inc()

    def observe_cost(self, model: str | None, key: str | None, usd: float) -> None:
        """Spend in USD; `key` is the API key id (bounded by the keys that exist), "" for none (JWT)."""
        if usd > 0:
            self.cost.labels(self.model_label(model), key or "").inc(usd)

    # -- refusals -------------------------------------------------------------------------------

    def rate_limited(self, kind: str) -> None:
        """A 429 from a rate limit: `kind` is "requests" or "tokens"."""
        self.rate_limit_rejections.labels(kind).inc()

    def shed(self) -> None:
        """A request refused at arrival: the server was at its in-flight bound."""
        self.shed_requests.inc()

    def budget_refused(self, scope: str) -> None:
        """A request refused because a budget is spent: `scope` is e.g. "key", "user", "agent", "global"."""
        self.budget_rejections.labels(scope).inc()

    # -- agents ---------------------------------------------------------------------------------

    def run_finished(self, agent: str, status: str, duration_s: float) -> None:
        """A run reached its final status (completed, failed, cancelled)."""
        self.agent_runs.labels(agent, status).inc()
        self.agent_run_duration.labels(agent, status).observe(max(0.0, duration_s))

    def tool_called(self, tool: str, outcome: str) -> None:
        """One tool call: `outcome` is e.g. "ok", "error", "timeout", "denied"."""
        self.tool_calls.labels(tool, outcome).inc()


def metric_names(registry: CollectorRegistry) -> Iterable[str]:
    """Every sample name the registry exposes now (what a scrape shows), for tests and checks."""
    for family in registry.collect():
        for sample in family.samples:
            yield sample.name
