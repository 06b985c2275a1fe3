"""What counts as weakening an agent, which models a run may call, and what an approval binds to."""

from __future__ import annotations

from typing import Any

import pytest

from strata.agents.approvals import binding, unique_call_ids
from strata.agents.guard_changes import audit_view, changed_fields, weakenings
from strata.agents.guards import permitted_models
from strata.config import AgentConfig

BASE: dict[str, Any] = {
    "name": "a",
    "model": "m1",
    "fallback_model": "m2",
    "system_prompt": "Be careful.",
    "tools": ["calculator", "record"],
    "require_approval": ["record"],
    "limits": {"max_steps": 5, "max_tokens": 1000, "timeout_s": 60, "loop_repeats": 3, "max_cost_usd": 1.0,
               "tool_rounds": 2},
    "max_tokens_per_step": 256,
}  # fmt: skip


def agent(**changes: Any) -> AgentConfig:
    limits = {**BASE["limits"], **changes.pop("limits", {})}
    return AgentConfig.model_validate({**BASE, **changes, "limits": limits})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"require_approval": []}, "require_approval no longer lists 'record'"),
        ({"tools": ["calculator", "record", "current_time"]}, "tools adds 'current_time'"),
        ({"model": "m3"}, "model changes from 'm1' to 'm3'"),
        ({"fallback_model": "m3"}, "fallback_model changes from 'm2' to 'm3'"),
        ({"limits": {"max_steps": 6}}, "limits.max_steps raised from 5 to 6"),
        ({"limits": {"max_tokens": 2000}}, "limits.max_tokens raised from 1000 to 2000"),
        ({"limits": {"timeout_s": 61}}, "limits.timeout_s raised from 60 to 61"),
        ({"limits": {"loop_repeats": 4}}, "limits.loop_repeats raised from 3 to 4"),
        ({"limits": {"max_cost_usd": None}}, "limits.max_cost_usd raised from 1 to none"),
        ({"limits": {"tool_rounds": None}}, "limits.tool_rounds raised from 2 to none"),
        ({"max_tokens_per_step": None}, "max_tokens_per_step raised from 256 to none"),
    ],
)
def test_each_weakening_is_named(changes: dict[str, Any], reason: str) -> None:
    assert weakenings(agent(), agent(**changes)) == [reason]


@pytest.mark.parametrize(
    "changes",
    [
        {"system_prompt": "Anything."},
        {"temperature": 1.5, "double_texting": "enqueue"},
        {"require_approval": ["record", "calculator"]},
        {"tools": ["record"]},
        {"fallback_model": None},
        {"limits": {"max_steps": 1, "timeout_s": 10, "loop_repeats": 2, "max_cost_usd": 0.5, "tool_rounds": 0}},
        {"max_tokens_per_step": 64},
    ],
)
def test_changes_that_keep_every_guard_weaken_nothing(changes: dict[str, Any]) -> None:
    assert weakenings(agent(), agent(**changes)) == []


def test_a_new_agent_is_measured_against_the_defaults() -> None:
    assert weakenings(None, AgentConfig(name="n", model="m1", system_prompt="x")) == []
    new = AgentConfig.model_validate({"name": "n", "model": "m1", "tools": ["record"], "limits": {"max_steps": 11}})
    assert weakenings(None, new) == ["tools adds 'record'", "limits.max_steps raised from 10 to 11"]


def test_the_audit_view_names_the_prompt_by_digest_and_lists_changes() -> None:
    before, after = audit_view(agent()), audit_view(agent(system_prompt="Other.", limits={"max_steps": 2}))
    assert before is not None and after is not None
    assert "Be careful." not in str(before) and before["system_prompt"]["chars"] == len("Be careful.")
    assert changed_fields(before, after) == ["limits.max_steps", "system_prompt"]


def test_a_run_calls_only_the_models_its_key_allows() -> None:
    spec = agent()
    assert permitted_models(spec, None) == (["m1", "m2"], [])
    assert permitted_models(spec, ["m1"]) == (["m1"], ["m2"])
    assert permitted_models(spec, ["m2"]) == (["m2"], ["m1"])  # the engine refuses the step: m1 is the agent's


def test_a_binding_changes_with_each_part_of_the_call() -> None:
    parts = ("run_1", 0, "dup", "record", '{"a":1}')
    same = binding(*parts)
    assert binding(*parts) == same
    for index, other in enumerate(("run_2", 1, "dup2", "note", '{"a":2}')):
        changed = list(parts)
        changed[index] = other
        assert binding(*changed) != same  # type: ignore[arg-type]


def test_calls_sharing_an_id_in_one_message_get_their_own() -> None:
    message = {"tool_calls": [{"id": "dup"}, {"id": "dup"}, {"id": ""}, {"id": "dup"}]}
    unique_call_ids(message)
    assert [c["id"] for c in message["tool_calls"]] == ["dup", "dup~2", "call_2", "dup~3"]
