"""Whose fault is a backend's error: the bodies model servers really answer, read and judged."""

from __future__ import annotations

import orjson

from strata.config import RetryConfig
from strata.serving.client import error_fields
from strata.serving.dispatch import retryable
from strata.serving.errors import UpstreamStatusError
from strata.serving.faults import FaultClassifier

# What llama-cpp-python 0.3.36's server answered (checked against the real server and SmolLM2).
LLAMA_ASSERT = b'{"error":{"message":"","type":"internal_server_error","param":null,"code":null}}'
LLAMA_VALIDATION = orjson.dumps(
    {
        "error": {
            "message": "7 validation errors:\n  {'type': 'literal_error', 'loc': ('body', 'messages', 0, "
            "'ChatCompletionRequestSystemMessage', 'role'), 'msg': \"Input should be 'system'\"}\n\n"
            '  File "/srv/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in '
            "create_chat_completion\n    POST /v1/chat/completions",
            "type": "internal_server_error",
            "param": None,
            "code": None,
        }
    }
)
LLAMA_NO_TOOL = b'{"error":{"message":"Tool with name \'g\' not found in tools","type":"internal_server_error"}}'
CUDA = b'{"error":{"message":"CUDA error: an illegal memory access was encountered","type":"internal_server_error"}}'


def upstream(status: int, body: bytes) -> UpstreamStatusError:
    message, param, code = error_fields(body)
    return UpstreamStatusError(
        message or f"the backend answered HTTP {status}",
        status=status,
        param=param,
        upstream_code=code,
        upstream_message=message,
    )


def judged(status: int, body: bytes) -> UpstreamStatusError:
    exc = upstream(status, body)
    FaultClassifier(RetryConfig().client_error_patterns).classify(exc)
    return exc


def test_llama_cpps_failed_assert_is_the_requests_fault_and_says_so() -> None:
    exc = judged(500, LLAMA_ASSERT)
    assert exc.caused_by_request and not retryable(exc)
    assert (exc.status, exc.upstream_status) == (400, 500)
    assert "gave no reason" in exc.message and 'tool_choice "required"' in exc.message


def test_llama_cpps_value_and_validation_errors_are_relayed_without_its_traceback() -> None:
    exc = judged(500, LLAMA_NO_TOOL)
    assert (exc.status, exc.caused_by_request) == (400, True)
    assert exc.message.endswith("Tool with name 'g' not found in tools")
    exc = judged(500, LLAMA_VALIDATION)
    assert exc.caused_by_request and "Input should be 'system'" in exc.message
    assert "File" not in exc.message and "/srv/venv" not in exc.message


def test_a_backend_failure_stays_the_backends() -> None:
    for status, body in ((500, CUDA), (500, b"Internal Server Error"), (500, b""), (503, LLAMA_ASSERT)):
        exc = judged(status, body)
        assert not exc.caused_by_request and retryable(exc), (status, body)
        assert exc.status == status


def test_4xx_is_the_requests_fault_except_credentials_timeouts_and_rate_limits() -> None:
    assert [upstream(s, b"{}").caused_by_request for s in (400, 404, 413, 422)] == [True] * 4
    assert [upstream(s, b"{}").caused_by_request for s in (401, 403, 408, 429)] == [False] * 4
    assert retryable(upstream(429, b"{}"))


def test_error_bodies_of_the_usual_model_servers_give_their_message() -> None:
    fastapi = orjson.dumps({"detail": [{"loc": ["body", "messages", 0, "role"], "msg": "Input should be 'user'"}]})
    assert error_fields(fastapi) == ("messages[0].role: Input should be 'user'", "messages[0].role", None)
    vllm = orjson.dumps({"object": "error", "message": "max_tokens is too large", "type": "BadRequestError",
                         "param": "max_tokens", "code": 400})  # fmt: skip
    assert error_fields(vllm) == ("max_tokens is too large", "max_tokens", None)
    openai = orjson.dumps({"error": {"message": "bad", "param": "n", "code": "invalid_value"}})
    assert error_fields(openai) == ("bad", "n", "invalid_value")
    assert error_fields(b'{"error": "model is loading"}') == ("model is loading", None, None)
    assert error_fields(b'{"detail": "Client closed request"}') == ("Client closed request", None, None)
    assert error_fields(LLAMA_ASSERT) == ("", None, None)
    assert error_fields(b"<html>502</html>") == (None, None, None)
