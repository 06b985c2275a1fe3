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
    web.run_app(mock.build_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
