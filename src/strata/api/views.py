"""The JSON shapes of runs, steps, sessions and messages in API responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from strata.store.runs import aware
from strata.store.tables import Message, Run, Session, Step


def _ts(value: datetime | None) -> str | None:
    return aware(value).isoformat() if value else None


def run_view(run: Run, steps: list[Step] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": run.id,
        "object": "run",
        "agent": run.agent,
        "agent_version": run.agent_version,
        "session_id": run.session_id,
        "status": run.status,
        "status_reason": run.status_reason,
        "output": run.output,
        "steps_taken": run.steps_taken,
        "usage": {
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens,
            "total_tokens": run.prompt_tokens + run.completion_tokens,
        },
        "cost_usd": round(run.cost_usd, 8),
        "pending_approval": run.pending_approval,
        "attempts": run.attempts,
        "created_at": _ts(run.created_at),
        "started_at": _ts(run.started_at),
        "finished_at": _ts(run.finished_at),
    }
    if steps is not None:
        view["steps"] = [step_view(step) for step in steps]
    return view


def step_view(step: Step) -> dict[str, Any]:
    return {
        "turn": step.turn,
        "kind": step.kind,
        "name": step.name,
        "call_id": step.call_id or None,
        "status": step.status,
        "idempotency_key": step.idempotency_key,
        "input": step.input,
        "output": step.output,
        "error": step.error,
        "usage": {"prompt_tokens": step.prompt_tokens, "completion_tokens": step.completion_tokens},
        "attempts": step.attempts,
        "started_at": _ts(step.started_at),
        "finished_at": _ts(step.finished_at),
    }


def session_view(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "object": "session",
        "agent": session.agent,
        "metadata": session.metadata_,
        "created_at": _ts(session.created_at),
        "updated_at": _ts(session.updated_at),
    }


def message_view(message: Message) -> dict[str, Any]:
    return {"seq": message.seq, "run_id": message.run_id, **message.data, "created_at": _ts(message.created_at)}
