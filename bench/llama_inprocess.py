"""llama-cpp-python called in-process: the library floor of the embedded-model scenario.

`python -m bench.llama_inprocess LAUNCH_FILE` loads the model with exactly the settings Strata handed its
llama.cpp server (the same launch file, through llama-cpp-python's own `ModelSettings` and `LlamaProxy`, so
threads, context size and chat format match, and with the chat handler Strata's server registers), then answers
one JSON request body per stdin line with one JSON result per stdout line. The body is turned into
`create_chat_completion` arguments the way llama-cpp-python's server does it (same request model, same defaults,
the same `min_tokens` logits processor), so the sampling is identical and only the HTTP layers are missing. It
lives in its own process, so its CPU is separate from the harness's and it sits idle while the other targets are
measured.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson

# What llama-cpp-python's server drops from the body before calling create_chat_completion.
SERVER_EXCLUDES = {"n", "logit_bias_type", "user", "min_tokens"}
REPORTED_SETTINGS = ("n_ctx", "n_threads", "n_threads_batch", "n_batch", "chat_format", "use_mmap")


def _arguments(llama: Any, payload: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp.server.types import CreateChatCompletionRequest

    body = CreateChatCompletionRequest(**payload)
    kwargs = body.model_dump(exclude=SERVER_EXCLUDES)
    if body.min_tokens > 0:
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llama.token_eos())]
        )
    return kwargs


def generate(llama: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """One completion, timed from the call to the last token: wall, time to first content, tokens, text."""
    kwargs = _arguments(llama, payload)
    started = time.perf_counter()
    if not kwargs.get("stream"):
        result = llama.create_chat_completion(**kwargs)
        wall = time.perf_counter() - started
        choice = result["choices"][0]
        return {
            "wall_s": wall,
            "ttft_s": None,
            "completion_tokens": result["usage"]["completion_tokens"],
            "chunks": None,
            "finish_reason": choice["finish_reason"],
            "text": choice["message"].get("content") or "",
        }
    first: float | None = None
    parts: list[str] = []
    finish = None
    for chunk in llama.create_chat_completion(**kwargs):
        choice = chunk["choices"][0]
        content = choice["delta"].get("content")
        if content:
            if first is None:
                first = time.perf_counter() - started
            parts.append(content)
        finish = choice.get("finish_reason") or finish
    return {
        "wall_s": time.perf_counter() - started,
        "ttft_s": first,
        "completion_tokens": None,
        "chunks": len(parts),
        "finish_reason": finish,
        "text": "".join(parts),
    }


def main(launch_file: Path) -> int:
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings

    from strata.serving import embedded_chat

    embedded_chat.register()  # the chat handling Strata's model server has (`strata.serving.embedded_server`)
    launch = orjson.loads(launch_file.read_bytes())
    models = [ModelSettings(**model) for model in launch["models"]]
    llama = LlamaProxy(models=models)(None)
    effective = models[0].model_dump()
    ready = {"ready": True, "settings": {k: effective.get(k) for k in REPORTED_SETTINGS}}
    sys.stdout.write(orjson.dumps(ready).decode() + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(orjson.dumps(generate(llama, orjson.loads(line))).decode() + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
