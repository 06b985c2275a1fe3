"""What an approval binds to: one pending tool call, never a call id.

A model chooses its call ids, and may reuse one (`dup`) in a later step with another tool or other
arguments. An approval is therefore keyed by a *binding*: a digest of the run, the step (turn), the call
id, the tool and the exact arguments the approver was shown. A call that differs in any of these is a new
call and pauses for its own approval; an approval whose binding no longer names a pending call is stale.
"""

from __future__ import annotations

import hashlib
from typing import Any


def binding(run_id: str, turn: int, call_id: str, tool: str, arguments: str) -> str:
    """The key an approval of this exact call is stored under (and the token an approver may send back)."""
    arguments_hash = hashlib.sha256(arguments.encode()).hexdigest()
    text = "\x00".join((run_id, str(turn), call_id, tool, arguments_hash))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def call_binding(run_id: str, turn: int, call: dict[str, Any]) -> str:
    function = call["function"]
    return binding(run_id, turn, call["id"], function["name"], function["arguments"] or "")


def pending_entry(run_id: str, turn: int, call: dict[str, Any]) -> dict[str, Any]:
    """A call as `approval.requested` and the run's `pending_approval` show it to approvers."""
    function = call["function"]
    return {
        "id": call["id"],
        "name": function["name"],
        "arguments": function["arguments"],
        "turn": turn,
        "binding": call_binding(run_id, turn, call),
    }


def unique_call_ids(message: dict[str, Any]) -> None:
    """Give each tool call of one assistant message its own id (in place): results are matched to calls by
    id, so two calls sharing one would be answered, approved and journaled as one."""
    seen: set[str] = set()
    for index, call in enumerate(message.get("tool_calls") or ()):
        call_id = call.get("id") or f"call_{index}"
        candidate, n = call_id, 1
        while candidate in seen:
            n += 1
            candidate = f"{call_id}~{n}"
        call["id"] = candidate
        seen.add(candidate)
