"""The embedded model's request adaptation: tool results must reach a chatml-function-calling model."""

from __future__ import annotations

from pathlib import Path

from strata.config import AdmissionConfig, BreakerConfig, EmbeddedModelConfig
from strata.resilience.admission import AdmissionController
from strata.resilience.breaker import CircuitBreaker
from strata.serving.deployment import Guards
from strata.serving.embedded import EmbeddedDeployment

MESSAGES = [
    {"role": "user", "content": "12*7?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "84"},
]


def deployment(tmp_path: Path, chat_format: str | None) -> EmbeddedDeployment:
    guards = Guards(AdmissionController.from_config(AdmissionConfig()), CircuitBreaker("x", BreakerConfig()))
    return EmbeddedDeployment(EmbeddedModelConfig(chat_format=chat_format), tmp_path, guards)


def test_tool_results_become_user_turns_for_the_function_calling_format(tmp_path: Path) -> None:
    adapted = deployment(tmp_path, "chatml-function-calling").adapt({"messages": MESSAGES, "model": "m"})
    assert adapted["messages"][-1] == {"role": "user", "content": "Result of calculator: 84"}
    assert adapted["messages"][:2] == MESSAGES[:2]
    assert MESSAGES[-1]["role"] == "tool"  # the caller's payload is not modified


def test_other_formats_get_the_request_unchanged(tmp_path: Path) -> None:
    payload = {"messages": MESSAGES, "model": "m"}
    assert deployment(tmp_path, None).adapt(payload) is payload
