"""Credentials out of spans before they leave the process or reach the local trace store.

A key a client pastes into a URL path or sends as the `model` ends up in a span's name (`chat {model}`) and
attributes (`url.path`, `gen_ai.request.model`). Spans are masked where they are exported (the OTLP
exporter's thread) and where they are stored (the local store's writer), never on a request's path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

from strata.security.redaction import Redactor


def redact_attributes(attributes: Mapping[str, Any] | None, redactor: Redactor) -> dict[str, Any]:
    return {key: _value(value, redactor) for key, value in (attributes or {}).items()}


def redact_span(span: ReadableSpan, redactor: Redactor) -> ReadableSpan:
    """The span itself when it holds no credential, else a copy with every string masked."""
    name = redactor.text(span.name)
    attributes = redact_attributes(span.attributes, redactor)
    events = [Event(e.name, redact_attributes(e.attributes, redactor), e.timestamp) for e in span.events]
    description = span.status.description
    masked = redactor.text(description) if description else description
    unchanged = (
        name == span.name
        and attributes == dict(span.attributes or {})
        and all(new.attributes == dict(old.attributes or {}) for new, old in zip(events, span.events, strict=True))
        and masked == description
    )
    if unchanged:
        return span
    return ReadableSpan(
        name=name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=Status(span.status.status_code, masked),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingExporter(SpanExporter):
    """Wraps an exporter: what it sends is masked first."""

    def __init__(self, inner: SpanExporter, redactor: Redactor) -> None:
        self.inner = inner
        self.redactor = redactor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([redact_span(span, self.redactor) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _value(value: Any, redactor: Redactor) -> Any:
    if isinstance(value, str):
        return redactor.text(value)
    if isinstance(value, tuple | list):
        return type(value)(_value(v, redactor) for v in value)
    return value
