"""Durable agent functions: an agent is an async function over a `RunContext` whose primitives are journaled.

See `context.py` for the primitives and the replay rule, `journal.py` for what is recorded, `ports.py` for
what the context needs from the rest of Strata (model, tools, runs, approvals), `clock.py` for time.
"""

from strata.agents.durable.clock import Clock, ManualClock, SystemClock
from strata.agents.durable.context import RunContext, StepFailed
from strata.agents.durable.journal import Entry, Journal, MemoryJournal, NonDeterminism
from strata.agents.durable.ports import ApprovalDecision, ChildResult, ModelReply, Ports, Suspended, ToolOutput

__all__ = [
    "ApprovalDecision",
    "ChildResult",
    "Clock",
    "Entry",
    "Journal",
    "ManualClock",
    "MemoryJournal",
    "ModelReply",
    "NonDeterminism",
    "Ports",
    "RunContext",
    "StepFailed",
    "Suspended",
    "SystemClock",
    "ToolOutput",
]
