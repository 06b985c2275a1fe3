"""Token usage for responses whose backend does not report it (llama.cpp's streams, some proxies).

Strata promises `usage` on every response, because budgets and rate limits are built on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import orjson

from strata.compute.tokens import count_tokens
from strata.serving.client import OpenAIClient
from strata.serving.errors import ServingError

# Chat templates wrap each message in a few marker tokens, and prime the reply with a few more
# (OpenAI's published rule of thumb is 3 and 3); close enough for every chatml-like template.
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMER = 3


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class TokenCounter(Protocol):
    async def count(self, text: str) -> int: ...


class ApproximateTokenCounter:
    """About four bytes of UTF-8 per token: the common figure for BPE vocabularies on English text."""

    async def count(self, text: str) -> int:
        return count_tokens(text)


class LlamaServerTokenCounter:
    """Exact counts from the launched llama.cpp server's own tokenizer (its `/extras` API)."""

    def __init__(self, client: OpenAIClient) -> None:
        self._client = client
        self._fallback = ApproximateTokenCounter()

    async def count(self, text: str) -> int:
        # The count route lives beside /v1, at the server's root.
        url = self._client.base_url.removesuffix("/v1") + "/extras/tokenize/count"
        try:
            reply = await self._client.post_json_url(url, orjson.dumps({"input": text}))
            return int(orjson.loads(reply.body)["count"])
        except (ServingError, KeyError, ValueError, TypeError):
            return await self._fallback.count(text)
