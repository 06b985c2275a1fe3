"""OpenTelemetry tracing: one `Tracing` object per app, handed to whatever makes spans.

Spans: the server span of every request (`api.tracing_middleware`), `invoke_agent {agent}` for a run
(`agents.engine`), `chat {model}` for each model call (`serving.chat`, `agents.model_call`) and
`execute_tool {tool}` for each tool call, with the GenAI semantic-convention attributes
(`observability.tracing_genai`). Retries, fallbacks, breaker trips and queue waits are span events.

Cost. Starting and ending a sampled span costs some 20 us; nothing is exported on a request's path:
ended spans go to bounded queues, the OTLP exporter's batch processor sends them from its own thread
and the local store's writer (`observability.tracing_store`) writes them in batches from a background
task. Unsampled spans cost a third of that; with `tracing.enabled: false` the tracer is OTel's no-op
one and the middleware is not even installed.

No OTel globals: the provider belongs to the app (two apps in one process, as in tests, keep their own
spans), and is shut down with it. The current span travels in OTel's context (a contextvar), so code
that only adds an event or reads the trace context needs no tracer: see the module functions below.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from strata import __version__
from strata.config import TracingConfig
from strata.observability import tracing_genai as genai
from strata.observability.tracing_redact import RedactingExporter
from strata.observability.tracing_store import LocalSpanProcessor, RunScopeProcessor, SpanWriter
from strata.security.redaction import Redactor
from strata.store.database import Database
from strata.store.spans import SpanStore

log = structlog.get_logger("strata.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PROPAGATOR = TraceContextTextMapPropagator()
_EXPORT_TIMEOUT_S = 10.0
PROJECT_NAME = "openinference.project.name"  # the resource attribute Arize Phoenix groups traces by

__all__ = [
    "INVALID_SPAN",
    "Span",
    "SpanKind",
    "Tracing",
    "add_event",
    "current_span",
    "extract",
    "fail",
    "inject",
    "set_principal",
    "trace_ids",
    "traceparent",
]


class Tracing:
    """The app's tracer and what stores and exports its spans. Build with `from_config`, then `start(db)`
    in the lifespan once the database is open, and `shutdown()` last (it flushes)."""

    def __init__(
        self,
        config: TracingConfig,
        provider: TracerProvider | None,
        local: LocalSpanProcessor | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.config = config
        self.redactor = redactor or Redactor()
        self.capture_content = config.capture_content and provider is not None
        self._provider = provider
        self._tracer: trace.Tracer = (
            provider.get_tracer("strata", __version__) if provider is not None else trace.NoOpTracer()
        )
        self._local = local
        self._writer: SpanWriter | None = None
        self.store: SpanStore | None = None  # the local trace store, once started (None if it is off)

    @classmethod
    def from_config(
        cls, config: TracingConfig, *, exporters: Sequence[SpanExporter] = (), redactor: Redactor | None = None
    ) -> Tracing:
        """`exporters`: more exporters, each behind a synchronous processor (for tests). `redactor` masks
        credentials in what is exported and stored (default: by shape)."""
        redactor = redactor or Redactor()
        if not config.enabled:
            return cls(config, None, redactor=redactor)
        resource = Resource.create(resource_attributes(config))
        sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
        provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(RunScopeProcessor())  # first: it sets attributes the others store
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            headers = {name: value.get_secret_value() for name, value in config.otlp_headers.items()}
            exporter = OTLPSpanExporter(
                endpoint=config.otlp_endpoint, headers=headers or None, timeout=_EXPORT_TIMEOUT_S
            )
            # Its failures (a collector down) are logged by the SDK: rate-limited JSON lines, see logging.py.
            provider.add_span_processor(BatchSpanProcessor(RedactingExporter(exporter, redactor)))
        local = LocalSpanProcessor() if config.local_store else None
        if local is not None:
            provider.add_span_processor(local)
        for extra in exporters:
            provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(extra, redactor)))
        return cls(config, provider, local, redactor)

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(TracingConfig(enabled=False), None)

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    @property
    def tracer(self) -> trace.Tracer:
        return self._tracer

    @property
    def spans_rejected(self) -> int:
        """Spans the local trace store refused for their content (each dropped; the rest of its batch written)."""
        return self._writer.rejected if self._writer is not None else 0

    async def start(self, db: Database) -> None:
        """Start writing spans to the local trace store in `db` (when `tracing.local_store` is on)."""
        if self._local is None or self._writer is not None:
            return
        self.store = SpanStore(db)
        self._writer = SpanWriter(
            self._local, self.store, retention_s=self.config.local_retention_hours * 3600, redactor=self.redactor
        )
        await self._writer.start()

    async def flush(self) -> None:
        """Export and store every span ended so far (tests; shutdown does it anyway)."""
        if self._provider is not None:
            await asyncio.to_thread(self._provider.force_flush)
        if self._writer is not None:
            await self._writer.flush()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Flush and stop: call after everything that makes spans has stopped, before the database closes."""
        if self._provider is not None:
            try:
                # Joins the exporter's thread, which may be waiting on an unreachable collector.
                await asyncio.wait_for(asyncio.to_thread(self._provider.shutdown), timeout_s)
            except TimeoutError:
                log.warning("the trace exporter did not finish within its time; some spans are lost")
        if self._writer is not None:
            await self._writer.stop(timeout_s)
            self._writer = None

    # -- making spans ------------------------------------------------------------------------------

    def start_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        parent: Context | None = None,
    ) -> Span:
        """A span that is not made current; end it yourself (`span.end()`)."""
        if self._provider is None:
            return INVALID_SPAN
        return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)

    @contextlib.contextmanager
    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        parent: Context | None = None,
    ) -> Iterator[Span]:
        """A span, current inside the block. An exception marks it failed (`error.type`, status ERROR) and
        goes on; a cancellation only marks it `strata.cancelled`. `parent`: a context from `extract()`."""
        if self._provider is None:
            yield INVALID_SPAN
            return
        span = self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        with activate(span, parent):
            yield span


def resource_attributes(config: TracingConfig) -> dict[str, str]:
    """Who sends these spans, as backends group them: the service, the project LLM-trace backends file them
    under (Phoenix reads `openinference.project.name`; Langfuse takes the project from its API key and the
    environment from `deployment.environment`), and the environment."""
    attributes = {
        "service.name": config.service_name,
        "service.version": __version__,
        PROJECT_NAME: config.project or config.service_name,
    }
    if config.environment:
        attributes["deployment.environment.name"] = config.environment
        attributes["deployment.environment"] = config.environment  # the name before semantic conventions 1.27
    return {**attributes, **config.resource_attributes}


@contextlib.contextmanager
def activate(span: Span, parent: Context | None = None, *, end: bool = True) -> Iterator[Span]:
    """Make `span` current inside the block; mark it failed on an exception; end it after (unless `end=False`)."""
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except Exception as exc:
        fail(span, exc)
        raise
    except asyncio.CancelledError:
        if span.is_recording():
            span.set_attribute(genai.CANCELLED, True)
        raise
    finally:
        otel_context.detach(token)
        if end:
            span.end()


# -- the current span, without a tracer ------------------------------------------------------------


def current_span() -> Span:
    return trace.get_current_span()


def add_event(name: str, attributes: Mapping[str, Any] | None = None, span: Span | None = None) -> None:
    """An event on `span` (default: the current span), if it is recorded."""
    span = span or trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes or {})


def fail(span: Span, exc: BaseException | None = None, *, error_type: str | None = None, message: str = "") -> None:
    """Mark a span failed: `error.type` (kept if already set) and status ERROR with a short description."""
    if not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    if genai.ERROR_TYPE not in attributes:
        span.set_attribute(genai.ERROR_TYPE, error_type or (genai.error_type(exc) if exc else "error"))
    description = message or (str(getattr(exc, "message", None) or exc) if exc is not None else "")
    span.set_status(Status(StatusCode.ERROR, description[:512]))


def traceparent(span: Span | None = None) -> str | None:
    """The W3C `traceparent` of `span` (default: the current one); None without a valid span."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def inject(carrier: dict[str, str], span: Span | None = None) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) of `span` (default: the current one) to a header or `_meta` dict."""
    span = span or trace.get_current_span()
    value = traceparent(span)
    if value is not None:
        carrier[TRACEPARENT] = value
        state = span.get_span_context().trace_state
        if state:
            carrier[TRACESTATE] = state.to_header()
    return carrier


def with_trace_headers(headers: Mapping[str, str], span: Span | None) -> Mapping[str, str]:
    """`headers` plus the trace context of `span`, for a request to a backend; unchanged without a span."""
    if span is None or not span.get_span_context().is_valid:
        return headers
    return inject(dict(headers), span)


def extract(traceparent_value: str | None, tracestate: str | None = None) -> Context | None:
    """A parent context from a W3C `traceparent` (a client's header, or one stored with a run); None if the
    value is missing or malformed (a bad header is ignored, as the W3C spec asks)."""
    if not traceparent_value:
        return None
    carrier = {TRACEPARENT: traceparent_value}
    if tracestate:
        carrier[TRACESTATE] = tracestate
    context = _PROPAGATOR.extract(carrier, context=Context())
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def trace_ids(span: Span | None = None) -> tuple[str, str] | None:
    """(trace_id, span_id) in hex, for logs."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def set_principal(user: str, key_id: str | None, role: str | None = None) -> None:
    """Who the current request is for, once authenticated: on the request's span (the local store shows a
    trace to its owner; spans started later inherit it) and on every later log line of the request."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(genai.OWNER, user)
        if key_id:
            span.set_attribute(genai.KEY_ID, key_id)
        if role:
            span.set_attribute("strata.role", role)
    if key_id:
        structlog.contextvars.bind_contextvars(key_id=key_id)
