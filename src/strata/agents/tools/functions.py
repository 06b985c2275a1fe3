"""Python functions as tools: the argument schema comes from the signature's type hints, with each
parameter's `Annotated[..., Field(description=...)]` as its description (small models read those).

A parameter annotated `ToolContext` receives the invocation context (idempotency key, run id) and is
left out of the schema the model sees.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any, get_type_hints

import orjson
from pydantic import BaseModel, ValidationError, create_model

from strata.agents.tools.base import Tool, ToolContext, ToolError, ToolResult, ToolRisk, ToolSpec


class FunctionTool(Tool):
    def __init__(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float = 30.0,
        risk: ToolRisk = ToolRisk.LOW,
        requires_approval: bool = False,
        inline: bool = False,
    ) -> None:
        """`inline`: a plain function that never blocks and whose time is bounded (microseconds, whatever its
        arguments) is called on the event loop: a hop to a thread and back costs far more than the call."""
        self._function = function
        self._is_async = inspect.iscoroutinefunction(function)
        self._inline = inline and not self._is_async
        hints = get_type_hints(function, include_extras=True)
        self._context_param: str | None = None
        fields: dict[str, Any] = {}
        for param in inspect.signature(function).parameters.values():
            annotation = hints.get(param.name, Any)
            if annotation is ToolContext:
                self._context_param = param.name
                continue
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (annotation, default)
        self._arguments: type[BaseModel] = create_model(f"{function.__name__}_arguments", **fields)
        schema = self._arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        doc = inspect.getdoc(function) or ""
        self.spec = ToolSpec(
            name=name or function.__name__,
            description=description or doc.split("\n\n")[0] or function.__name__,
            parameters=schema,
            timeout_s=timeout_s,
            risk=risk,
            requires_approval=requires_approval,
        )

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        try:
            parsed = self._arguments.model_validate(arguments)
        except ValidationError as exc:
            raise ToolError(f"invalid arguments for {self.name}: {exc.errors(include_url=False)}") from None
        kwargs = dict(parsed)
        if self._context_param:
            kwargs[self._context_param] = context
        if self._is_async:
            value = await self._function(**kwargs)
        elif self._inline:
            value = self._function(**kwargs)
        else:  # a plain function may block: keep it off the event loop
            value = await asyncio.to_thread(self._function, **kwargs)
        if isinstance(value, ToolResult):
            return value
        text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
        return ToolResult(text)


def load_function(import_path: str) -> Callable[..., Any]:
    module_name, _, attribute = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {import_path!r}: {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{import_path!r} is not a function")
    return function
