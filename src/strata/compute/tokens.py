"""Token counts computed off the event loop when the text is large enough to be worth a process hop.

`count_tokens` is the same estimate as `serving.usage.ApproximateTokenCounter` (about four bytes of
UTF-8 per token), so counts do not change with where they are computed. A real tokenizer can take its
place as `count_fn`: any module-level `str -> int` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from strata.compute.offload import CpuPool, CpuPoolError

DEFAULT_THRESHOLD_BYTES = 32_768


def count_tokens(text: str) -> int:
    """About four bytes of UTF-8 per token (ceil): the estimate every Strata counter uses."""
    return math.ceil(len(text.encode("utf-8")) / 4)


class PooledTokenCounter:
    """A `TokenCounter` (serving.usage): small texts inline, where a process hop would cost more than
    the count; large ones in the CPU pool."""

    def __init__(
        self,
        pool: CpuPool,
        threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        *,
        count_fn: Callable[[str], int] = count_tokens,
        timeout_s: float | None = None,
    ) -> None:
        self._pool = pool
        self._threshold = threshold_bytes
        self._count = count_fn
        self._timeout_s = timeout_s

    async def count(self, text: str) -> int:
        if not self._is_large(text):
            return self._count(text)
        try:
            return await self._pool.run(self._count, text, timeout_s=self._timeout_s)
        except CpuPoolError:
            # Usage is what budgets and rate limits are built on: a full, stopped or slow pool must
            # not lose the count. The byte estimate is cheap enough to compute here.
            return count_tokens(text)

    def _is_large(self, text: str) -> bool:
        # UTF-8 takes 1 to 4 bytes a character: the length settles most texts without encoding them.
        if len(text) > self._threshold:
            return True
        if len(text) * 4 <= self._threshold:
            return False
        return len(text.encode("utf-8")) > self._threshold
