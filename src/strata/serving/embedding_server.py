"""The embedded embedding model's server process: `POST /v1/embeddings` over a GGUF model in llama.cpp.

llama-cpp-python's own server cannot do this for the bundled SmolLM2: it offers no pooling setting, and a model
without a pooling type of its own answers one vector per token. Here the model is loaded with mean pooling (the
hidden states averaged over the input's tokens, then L2-normalised), which gives sentence vectors good enough
to rank similar texts above unrelated ones; it is a chat model's states, not a trained embedding model's.

`EmbeddedDeployment` runs `python -m strata.serving.embedding_server --config_file FILE` for a model with
`embedding: true`. Like the chat server: loopback only, a bearer token made anew per launch, in a 0600 file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import struct
from pathlib import Path
from typing import Annotated, Literal

import llama_cpp
import orjson
import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


class Settings(BaseModel):
    """What Strata writes into the config file."""

    model_config = ConfigDict(extra="forbid")
    host: str
    port: int
    api_key: str
    model: str  # the GGUF file
    model_alias: str
    n_ctx: int
    n_threads: int | None = None


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request as this server takes it: text only (token ids mean nothing to this model)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


def error(status: int, message: str, param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _first_problem(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith(("str", "list["))]
    param = loc[0] if loc else "body"
    if param == "input" and first["type"] in ("string_type", "list_type"):
        return param, (
            "input: give a string or a list of strings; the embedded model takes text, not token ids "
            "(langchain-openai: OpenAIEmbeddings(check_embedding_ctx_length=False))"
        )
    return param, f"{'.'.join(loc) or 'body'}: {first['msg']}"


class Embedder:
    """One llama.cpp context in embedding mode; calls take turns (a context is not thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        threads = {"n_threads": settings.n_threads, "n_threads_batch": settings.n_threads} if settings.n_threads else {}
        self.alias = settings.model_alias
        self.llama = llama_cpp.Llama(
            settings.model,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            n_ctx=settings.n_ctx,
            n_batch=settings.n_ctx,  # an input must fit one batch: pooling sees the whole sequence at once
            verbose=False,
            **threads,
        )
        self.dimensions = self.llama.n_embd()
        self._turn = asyncio.Lock()

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        async with self._turn:
            return await run_in_threadpool(self._embed, texts)

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        counts = [len(self.llama.tokenize(text.encode("utf-8"), add_bos=True)) for text in texts]
        for index, count in enumerate(counts):
            if count > self.llama.n_ctx():
                raise InputTooLong(index, count, self.llama.n_ctx())
        vectors = self.llama.embed(texts, normalize=True)
        return vectors, sum(counts)  # type: ignore[return-value]


class InputTooLong(ValueError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"input[{index}]: {tokens} tokens, more than this model's context of {limit}")
        self.param = f"input[{index}]"


def build_app(settings: Settings, embedder: Embedder) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorised(request):
            return error(401, "invalid API key")
        data = [{"id": embedder.alias, "object": "model", "owned_by": "strata"}]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        if not authorised(request):
            return error(401, "invalid API key")
        try:
            payload = orjson.loads(await request.body())
            body = EmbeddingRequest.model_validate(payload)
        except orjson.JSONDecodeError:
            return error(400, "the request body is not valid JSON")
        except ValidationError as exc:
            param, message = _first_problem(exc)
            return error(400, message, param)
        texts = [body.input] if isinstance(body.input, str) else body.input
        for index, text in enumerate(texts):
            if not text:
                param = "input" if isinstance(body.input, str) else f"input[{index}]"
                return error(400, f"{param}: an empty string has no embedding", param)
        if body.dimensions is not None and body.dimensions != embedder.dimensions:
            return error(
                400,
                f"dimensions: this model's vectors have {embedder.dimensions} dimensions and cannot be shortened",
                "dimensions",
            )
        try:
            vectors, tokens = await embedder.embed(texts)
        except InputTooLong as exc:
            return error(400, str(exc), exc.param)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": embedder.alias, "usage": usage}
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """`base64`: the little-endian float32 bytes, as OpenAI sends them (the openai SDK asks for this by default)."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config_file", type=Path, required=True)
    settings = Settings.model_validate_json(parser.parse_args().config_file.read_bytes())
    app = build_app(settings, Embedder(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
