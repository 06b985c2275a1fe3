"""One tool call as the engine makes it: traced, time-limited, every failure turned into an error result.

Both the built-in tool-calling agent and `ctx.tool` of a code agent call tools through here.
"""

from __future__ import annotations

import asyncio

import orjson
import structlog

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult
from strata.observability import tracing_genai as genai
from strata.observability.tracing import Tracing, fail

log = structlog.get_logger("strata.engine")


async def traced_invoke(
    tracing: Tracing, tools: dict[str, Tool], run_id: str, name: str, call_id: str, arguments_text: str, key: str
) -> tuple[ToolResult, str]:
    """The result and its outcome for metrics: ok, error or timeout. `key` is the call's idempotency key."""
    if not tracing.enabled:
        return await invoke(tools, run_id, name, arguments_text, key)
    attributes = {
        genai.OPERATION: genai.EXECUTE_TOOL,
        genai.TOOL_NAME: name,
        genai.TOOL_CALL_ID: call_id,
        genai.TOOL_TYPE: tool.kind if (tool := tools.get(name)) is not None else "function",
    }
    if tracing.capture_content:
        attributes[genai.TOOL_ARGUMENTS] = genai.clip(arguments_text)
    with tracing.span(f"{genai.EXECUTE_TOOL} {name}", attributes=attributes) as span:
        result = await invoke(tools, run_id, name, arguments_text, key)
        if tracing.capture_content and span.is_recording():
            span.set_attribute(genai.TOOL_RESULT, genai.clip(result[0].content))
        if result[0].is_error:
            fail(span, error_type="tool_error", message=result[0].content)
        return result


async def invoke(
    tools: dict[str, Tool], run_id: str, name: str, arguments_text: str, key: str
) -> tuple[ToolResult, str]:
    tool = tools.get(name)
    if tool is None:
        return ToolResult(f"unknown tool {name!r}; available: {', '.join(sorted(tools))}", True), "error"
    try:
        arguments = orjson.loads(arguments_text or "{}")
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError as exc:
        return ToolResult(f"the arguments are not a JSON object: {exc}", True), "error"
    timeout = tool.spec.timeout_s
    try:
        async with asyncio.timeout(timeout):  # no task per call, as `wait_for` makes
            result = await tool.invoke(arguments, ToolContext(run_id, key, timeout))
    except ToolError as exc:
        return ToolResult(str(exc), True), "error"
    except TimeoutError:
        return ToolResult(f"the tool timed out after {timeout:g}s", True), "timeout"
    except Exception as exc:
        log.exception("tool crashed", tool=name, run_id=run_id)
        return ToolResult(f"the tool failed: {type(exc).__name__}: {exc}", True), "error"
    return result, "error" if result.is_error else "ok"
