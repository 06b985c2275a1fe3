"""A stand-in for `vllm serve` on machines without a GPU: same command line, same auth, an
OpenAI-compatible server (the mock backend). It records what it was started with in
$FAKE_VLLM_RECORD so tests can check the launch."""

from __future__ import annotations

import argparse
import json
import os
import sys

from aiohttp import web

from tests.support.mock_backend import MockBackend, Reply


def main() -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    args, _ = parser.parse_known_args()  # the other vLLM flags are recorded, not interpreted
    record = os.environ.get("FAKE_VLLM_RECORD")
    if record:
        with open(record, "a") as handle:
            keys = ("CUDA_VISIBLE_DEVICES", "VLLM_API_KEY", "HF_HOME")
            handle.write(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}) + "\n")
    mock = MockBackend(args.host, args.port, api_key=os.environ.get("VLLM_API_KEY"))
    mock.models = [args.served_model_name]
    mock.default = Reply(content=f"{args.model} says hi")
    app = mock.build_app()
    name = args.served_model_name

    async def metrics(request: web.Request) -> web.Response:  # unauthenticated, as vLLM's is
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{name}"}} {mock.in_flight}.0\n'
            "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f'vllm:gpu_cache_usage_perc{{model_name="{name}"}} 0.25\n'
        )
        return web.Response(text=text, content_type="text/plain")

    app.router.add_get("/metrics", metrics)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
