"""Whose fault is a backend's error answer: the request's or the backend's?

A request the backend cannot process fails the same way on every replica and every retry: retrying it
only multiplies the load, and counting it against the backend's circuit breaker would let one client's
bad requests shut every other client out. A 4xx answer is the request's fault (except 401/403, which
concern Strata's own credentials, 408 and 429). A 500 is when the backend's error message matches one
of the model's `retry.client_error_patterns`: model servers such as llama-cpp-python answer 500 when a
check on the input fails (an `assert` on `tool_choice`, a `ValueError` on an unknown tool or role).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from strata.serving.errors import ServingError, UpstreamStatusError

# What a client is told when the backend gave no reason (llama-cpp-python's answer to a failed assert).
NO_REASON = (
    "a check on the input failed in the model server, which gave no reason (llama-cpp-python answers so "
    'for a parameter value it does not support, e.g. tool_choice "required"); its log has the details'
)

TRACEBACK = '\n\n  File "'
MAX_REASON = 4000


class FaultClassifier:
    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    def classify(self, exc: ServingError) -> None:
        """Mark a backend's 500 that the request caused as the client's error (in place); the rest stay.

        Only 500: 502, 503 and 504 come from proxies, overload and timeouts, never from the input."""
        if not isinstance(exc, UpstreamStatusError) or exc.status != 500:
            return
        reason = exc.upstream_message
        if reason is None or self._pattern is None or self._pattern.search(reason) is None:
            return
        # llama-cpp-python appends where in its code the error arose: the client needs the reason, not that.
        reason = reason.split(TRACEBACK, 1)[0].strip()[:MAX_REASON]
        exc.blame_request(f"the backend refused this request (HTTP {exc.status}): {reason or NO_REASON}")
