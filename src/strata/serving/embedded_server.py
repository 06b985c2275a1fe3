"""The embedded model's server process: llama-cpp-python's OpenAI server, with what Strata needs changed.

`EmbeddedDeployment` runs `python -m strata.serving.embedded_server --config_file FILE` (the same config file
llama-cpp-python's own server reads). Two changes:

- the `chatml-function-calling` chat format is `embedded_chat`'s (OpenAI's shapes, no HTML escaping, tool_choice
  "required", streamed tool calls);
- a non-streamed chat completion or completion stops when its client goes away. llama-cpp-python's server only notices a
  departed client in streams: a plain request ran to its end (to the context size, without max_tokens), and,
  one request at a time, every request behind it waited.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from llama_cpp import Llama, StoppingCriteriaList
from llama_cpp.server import app as llama_app
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.settings import ConfigFileSettings, ServerSettings
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.concurrency import run_in_threadpool

from strata.serving import embedded_chat
from strata.serving.llama_server import unescape_chat_templates

# What llama-cpp-python's server leaves out of the body before it calls the model (completions: best_of too).
SERVER_EXCLUDES = {"n", "logit_bias_type", "user", "min_tokens"}
CLIENT_CLOSED = 499  # nobody reads it: the client is gone

router = APIRouter(route_class=RouteErrorHandler)


@router.post("/v1/chat/completions", dependencies=[Depends(llama_app.authenticate)], include_in_schema=False)
async def chat_completions(request: Request, body: CreateChatCompletionRequest) -> object:
    if body.stream:  # llama-cpp-python's stream stops by itself when its client leaves
        return await llama_app.create_chat_completion(request, body)

    def complete(llama: Llama, kwargs: dict[str, Any], gone: threading.Event) -> object:
        token = embedded_chat.client_gone.set(gone)  # the worker thread gets a copy of this context
        try:
            return llama.create_chat_completion(**kwargs)
        finally:
            embedded_chat.client_gone.reset(token)

    return await _until_gone(request, body, body.model_dump(exclude=SERVER_EXCLUDES), complete)


@router.post("/v1/completions", dependencies=[Depends(llama_app.authenticate)], include_in_schema=False)
async def completions(request: Request, body: CreateCompletionRequest) -> object:
    if body.stream:
        return await llama_app.create_completion(request, body)
    if isinstance(body.prompt, list):  # one prompt, as llama-cpp-python's own route takes it
        body.prompt = body.prompt[0] if body.prompt else ""

    def complete(llama: Llama, kwargs: dict[str, Any], gone: threading.Event) -> object:
        return llama(**kwargs, stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: gone.is_set()]))

    return await _until_gone(request, body, body.model_dump(exclude=SERVER_EXCLUDES | {"best_of"}), complete)


async def _until_gone(
    request: Request,
    body: CreateChatCompletionRequest | CreateCompletionRequest,
    kwargs: dict[str, Any],
    complete: Callable[[Llama, dict[str, Any], threading.Event], object],
) -> object:
    """Run a non-streamed request in a thread, told (through `gone`) when its client leaves."""
    gone = threading.Event()
    watcher = asyncio.ensure_future(_watch(request, gone))
    try:
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as proxy:
            if gone.is_set():  # it left while waiting for the model
                return Response(status_code=CLIENT_CLOSED)
            llama = llama_app.prepare_request_resources(body, proxy, body.model, kwargs)
            return await run_in_threadpool(complete, llama, kwargs, gone)
    finally:
        watcher.cancel()


async def _watch(request: Request, gone: threading.Event) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


def build_app(config_file: Path) -> tuple[FastAPI, ServerSettings]:
    settings = ConfigFileSettings.model_validate_json(config_file.read_bytes())
    server = ServerSettings.model_validate(settings)
    embedded_chat.register()  # before the model loads: it looks its chat format up then
    app = llama_app.create_app(server_settings=server, model_settings=settings.models)
    app.include_router(router)
    routes = app.router.routes
    routes.insert(0, routes.pop())  # ours answers before llama-cpp-python's route for the same path
    return app, server


def main() -> None:
    unescape_chat_templates()  # llama-cpp-python's other chat formats render prompts as text, not HTML
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config_file", type=Path, required=True)
    app, server = build_app(parser.parse_args().config_file)
    uvicorn.run(app, host=server.host, port=server.port, log_level="warning")


if __name__ == "__main__":
    main()
