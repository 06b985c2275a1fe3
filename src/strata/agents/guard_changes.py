"""Which changes to an agent weaken its guards, and what an audit row says about a change.

A guard is anything that bounds what a run of the agent may do without a person: the approvals it waits
for, its tools, the models it calls, its limits. A new version *weakens* the agent when it

- stops requiring approval for a tool (`require_approval` loses a name);
- offers a tool it did not offer (`tools` gains a name);
- calls another model (`model` changes, or `fallback_model` is added or changed; removing it is not);
- raises or removes a limit: `limits.max_steps`, `max_tokens`, `timeout_s`, `loop_repeats` (more repeats
  before a loop is caught), `max_cost_usd` and `tool_rounds` (a higher number, or none), or
  `max_tokens_per_step` (higher, or none).

Everything else (`system_prompt`, `temperature`, `double_texting`) is behaviour, not a guard: a prompt
asks the model, it enforces nothing. A new agent is measured against an agent with the defaults (no tools,
no fallback, the default limits), so creating one cannot be used to side-step these rules.
"""

from __future__ import annotations

import hashlib
from typing import Any

from strata.config import AgentConfig

# Limits where a larger number is weaker; for those that may be None, None means "no limit".
_RAISABLE = ("max_steps", "max_tokens", "timeout_s", "loop_repeats", "max_cost_usd", "tool_rounds")


def weakenings(before: AgentConfig | None, after: AgentConfig) -> list[str]:
    """How `after` weakens `before` (the latest version; None: a new agent), one phrase each; empty if it does not."""
    base = before or AgentConfig(name=after.name, model=after.model)
    kept = after.require_approval
    found = [f"require_approval no longer lists {t!r}" for t in base.require_approval if t not in kept]
    found += [f"tools adds {t!r}" for t in after.tools if t not in base.tools]
    if after.model != base.model:
        found.append(f"model changes from {base.model!r} to {after.model!r}")
    if after.fallback_model is not None and after.fallback_model != base.fallback_model:
        found.append(f"fallback_model changes from {base.fallback_model!r} to {after.fallback_model!r}")
    for name in _RAISABLE:
        if _raised(getattr(base.limits, name), getattr(after.limits, name)):
            found.append(f"limits.{name} raised from {_show(getattr(base.limits, name))} to "
                         f"{_show(getattr(after.limits, name))}")  # fmt: skip
    if _raised(base.max_tokens_per_step, after.max_tokens_per_step):
        found.append(f"max_tokens_per_step raised from {_show(base.max_tokens_per_step)} to "
                     f"{_show(after.max_tokens_per_step)}")  # fmt: skip
    return found


def audit_view(spec: AgentConfig | None) -> dict[str, Any] | None:
    """A spec as an audit row shows it: everything but the prompt's text, which only its digest and length stand
    for (prompts are encrypted at rest; the audit trail is not the place to copy them to)."""
    if spec is None:
        return None
    view = spec.model_dump(mode="json")
    prompt = view.pop("system_prompt")
    view["system_prompt"] = {"sha256": hashlib.sha256(prompt.encode()).hexdigest(), "chars": len(prompt)}
    return view


def changed_fields(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """Top-level fields of two `audit_view`s that differ (limits by name: `limits.max_steps`)."""
    if before is None:
        return sorted(after)
    names = [k for k in after if k != "limits" and before.get(k) != after[k]]
    names += [f"limits.{k}" for k, v in after["limits"].items() if before["limits"].get(k) != v]
    return sorted(names)


def _raised(old: float | None, new: float | None) -> bool:
    if old is None:
        return False  # nothing bounded it before
    return new is None or new > old


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"
