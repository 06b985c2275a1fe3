"""The schema. Changing it means a new Alembic migration under `store/migrations/versions/`.

Conversation data (messages, run and step inputs and outputs, events, agent specs, session metadata) is
encrypted at rest by the Encrypted* column types; they are plain JSON / Text to the database, so encrypting
needs no migration. Columns a client's text can reach unencrypted (a model name, a request id, a run's
status reason) are Redacted*: credentials are masked before they are written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from strata.store.encrypted import EncryptedJSON, EncryptedText
from strata.store.redacted import RedactedString, RedactedText

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class AgentVersion(Base):
    __tablename__ = "agent_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("agent_versions.spec"))  # holds the system prompt
    source: Mapped[str] = mapped_column(String(16))  # "config" or "api"
    created_at: Mapped[datetime]


class Session(Base):
    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_created", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    agent: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", EncryptedJSON("sessions.metadata"), default=dict)
    next_message_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Message(Base):
    """One chat message of a session, in OpenAI's message format (`data`)."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("session_id", "seq"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(40), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    role: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("messages.data"))
    created_at: Mapped[datetime]


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("agent", "idempotency_key"),
        Index("ix_runs_claim", "status", "created_at"),
        Index("ix_runs_created", "created_at", "id"),  # lists, newest first (store/run_queries.py)
        Index("ix_runs_owner_created", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(40), index=True)
    agent: Mapped[str] = mapped_column(String(64))
    agent_version: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(24))
    status_reason: Mapped[str | None] = mapped_column(RedactedText())
    # A keyed hash of the client's Idempotency-Key (`store.idempotency`), never the key itself.
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    input: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("runs.input"))
    output: Mapped[str | None] = mapped_column(EncryptedText("runs.output"))
    steps_taken: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    next_event_seq: Mapped[int] = mapped_column(Integer, default=0)
    pending_approval: Mapped[list[Any] | None] = mapped_column(EncryptedJSON("runs.pending_approval"))
    approvals: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("runs.approvals"), default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime]
    # The W3C traceparent of the request that created the run: its `invoke_agent` spans join that trace.
    trace_parent: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(40))  # the API key that started it (None: a JWT)
    # The models that key could use when the run started (None: any): every model call of the run is held to it.
    allowed_models: Mapped[list[Any] | None] = mapped_column(JSON)
    # The agent's model when the run was created: only a replica serving it claims the run (None: any).
    model: Mapped[str | None] = mapped_column(String(128))
    # The run that started this one with `ctx.child` (None: started by a client).
    parent_run_id: Mapped[str | None] = mapped_column(String(40), index=True)


class Step(Base):
    """One model call or one tool call. Written `started` before it runs and `completed` after."""

    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("run_id", "turn", "kind", "call_id"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40), index=True)
    turn: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))  # "model" or "tool"
    call_id: Mapped[str] = mapped_column(String(128), default="")
    name: Mapped[str] = mapped_column(String(160))
    status: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    input: Mapped[dict[str, Any] | None] = mapped_column(EncryptedJSON("steps.input"))
    output: Mapped[dict[str, Any] | None] = mapped_column(EncryptedJSON("steps.output"))
    error: Mapped[str | None] = mapped_column(EncryptedText("steps.error"))  # tool errors can echo arguments
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class Event(Base):
    """The run's event log; `seq` is what SSE clients resume from with Last-Event-ID."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(40), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("events.data"))  # text deltas, tool results
    created_at: Mapped[datetime]


class ApiKey(Base):
    """An API key: only its SHA-256 hash is stored; `prefix` is what lists show to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    user: Mapped[str] = mapped_column(String(128), index=True)
    role: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    models: Mapped[list[Any] | None] = mapped_column(JSON)
    agents: Mapped[list[Any] | None] = mapped_column(JSON)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    budget_usd: Mapped[float | None] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(160))
    rotated_from: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditEvent(Base):
    """One security-relevant event. Append-only; `hash` chains each row to the one before it, an HMAC under a
    key derived from encryption key `kid` (None: an unkeyed row from before the chain was keyed)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(160))
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), index=True)
    resource: Mapped[str | None] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    kid: Mapped[str | None] = mapped_column(String(64))


class Usage(Base):
    """One model call (a chat completion or a run's model step): tokens, latency and cost. Append-only."""

    __tablename__ = "usage"
    __table_args__ = (
        Index("ix_usage_key_ts", "key_id", "ts"),
        Index("ix_usage_user_ts", "user", "ts"),
        Index("ix_usage_agent_ts", "agent", "ts"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(index=True)
    request_id: Mapped[str | None] = mapped_column(RedactedString(64))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(RedactedString(128))
    key_id: Mapped[str | None] = mapped_column(String(40))
    user: Mapped[str | None] = mapped_column(String(128))
    agent: Mapped[str | None] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(40))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)


class Span(Base):
    """One finished OpenTelemetry span in the local trace store (`GET /v1/runs/{id}/trace`). Append-only,
    pruned after `tracing.local_retention_hours`. `run_id` and `owner` come from the span's `strata.run.id`
    and `strata.owner` attributes (children inherit them), for lookups by run and per-user visibility.

    `attributes` holds what is no conversation content (names, models, token counts, status codes); the
    content attributes (prompts, answers, tool arguments and results, with `tracing.capture_content`) and
    the events (their error messages can echo content) are sealed together in `sealed`, left NULL when
    there are none, so a span without content costs no encryption."""

    __tablename__ = "spans"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    trace_id: Mapped[str] = mapped_column(String(32), index=True)
    span_id: Mapped[str] = mapped_column(String(16))
    parent_span_id: Mapped[str | None] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))
    start_ns: Mapped[int] = mapped_column(BigInteger, index=True)  # Unix epoch nanoseconds
    end_ns: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(8))  # "unset", "ok" or "error"
    status_message: Mapped[str | None] = mapped_column(EncryptedText("spans.status_message"))
    run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    owner: Mapped[str | None] = mapped_column(String(128))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON)
    sealed: Mapped[dict[str, Any] | None] = mapped_column(EncryptedJSON("spans.sealed"))  # {"attributes", "events"}


class ModelVersion(Base):
    """The version of a model every replica should serve (hot swap and reload are cluster-wide).

    `reference` is what the API validated, never a launch spec: {"profile": name}, an openai endpoint, or
    {"source": "config"} / {"removed": true}; each replica resolves it against its own configuration.
    `version` 0: no version desired yet (a number was handed out for a deploy still being health-checked)."""

    __tablename__ = "model_versions"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    allocated: Mapped[int] = mapped_column(Integer)  # the highest version number handed out
    reference: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime]
    updated_by: Mapped[str | None] = mapped_column(String(160))


class ModelReplica(Base):
    """What one replica serves of one model, as it last reported it (`seen_at` is its heartbeat)."""

    __tablename__ = "model_replicas"

    replica: Mapped[str] = mapped_column(String(96), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int | None] = mapped_column(Integer)  # in service here; None: not served here
    desired: Mapped[int | None] = mapped_column(Integer)  # the desired version this replica acted on last
    state: Mapped[str] = mapped_column(String(16))  # serving, failed, refused, removed
    note: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime]


class ConfigReload(Base):
    """A configuration reload: every replica re-reads its own file once for each row it has not seen."""

    __tablename__ = "config_reloads"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    by: Mapped[str | None] = mapped_column(String(160))


class StoredResponse(Base):
    """A Responses API response kept for retrieval and `previous_response_id` (`store: true`).

    `body` is the response object as the client got it; `conversation` the chat messages that led to it and
    its answer, which a follow-up request continues. A response answered by an agent keeps its run (and the
    run's session, which a follow-up continues) instead of a conversation."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(RedactedString(256))
    status: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]] = mapped_column(EncryptedJSON("responses.body"))
    conversation: Mapped[list[Any]] = mapped_column(EncryptedJSON("responses.conversation"))
    run_id: Mapped[str | None] = mapped_column(String(40))
    session_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
