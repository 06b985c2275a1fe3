"""A deployment: one backend serving one model name, with its pooled client and health."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from aiohttp.abc import AbstractResolver

from strata.config import EndpointConfig, OpenAIModelConfig
from strata.resilience.admission import AdmissionController
from strata.resilience.breaker import CircuitBreaker
from strata.serving.client import OpenAIClient
from strata.serving.usage import TokenCounter

CHAT, EMBEDDINGS, COMPLETIONS = "/chat/completions", "/embeddings", "/completions"  # the backend paths
WHAT = {CHAT: "chat completions", EMBEDDINGS: "embeddings", COMPLETIONS: "text completions"}


@dataclass(frozen=True)
class Guards:
    """Per-deployment protection: admission control (backpressure) and a circuit breaker."""

    admission: AdmissionController
    breaker: CircuitBreaker


@dataclass(frozen=True)
class DeploymentInfo:
    """What `/v1/models`, start-up output and logs show about a deployment."""

    model: str
    deployment: str
    kind: str
    target: str
    healthy: bool
    state: str


class Deployment(ABC):
    kind: str
    #: Does the backend put `usage` in streams when asked via `stream_options`? If not, Strata counts.
    reports_stream_usage: bool = True
    #: Can the backend stream an answer when `tools` are offered with tool_choice "auto"?
    streams_tool_calls: bool = True
    #: The OpenAI endpoints it answers (below /v1): an OpenAI-compatible server is taken at its word for all.
    serves: frozenset[str] = frozenset({CHAT, EMBEDDINGS, COMPLETIONS})

    def __init__(
        self,
        model: str,
        upstream_model: str,
        client: OpenAIClient,
        counter: TokenCounter,
        guards: Guards,
        weight: float = 1.0,
    ) -> None:
        self.model = model
        self.upstream_model = upstream_model
        self.client = client
        self.counter = counter
        self.admission = guards.admission
        self.breaker = guards.breaker
        self.weight = weight
        #: Monotonic time until which the backend asked (Retry-After) for no requests: others go first.
        self.paused_until = 0.0
        self._probe_ok = False

    @property
    def name(self) -> str:
        return self.client.deployment

    @property
    def load(self) -> float:
        """Outstanding requests (running and queued) per unit of weight, for load balancing."""
        return (self.admission.in_flight + self.admission.queued) / self.weight

    def pause(self, seconds: float) -> None:
        """The backend said `Retry-After: seconds`: prefer the other deployments until then."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    @property
    def paused_for_s(self) -> float:
        return max(0.0, self.paused_until - time.monotonic())

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self, grace_s: float) -> None: ...

    def adapt(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The request body as this backend needs it (most need nothing changed)."""
        return payload

    def adapt_completion(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A legacy text-completion request body as this backend needs it."""
        return payload

    def check_available(self) -> None:
        """Raise `BackendNotReadyError` when the deployment is known to be unable to answer now."""
        return None

    async def probe(self) -> bool:
        self._probe_ok = await self.client.probe()
        return self.healthy

    @property
    def healthy(self) -> bool:
        return self._probe_ok

    @property
    def state(self) -> str:
        return "healthy" if self.healthy else "unhealthy"

    def info(self) -> DeploymentInfo:
        return DeploymentInfo(
            self.model, self.client.deployment, self.kind, self.client.base_url, self.healthy, self.state
        )


class RemoteDeployment(Deployment):
    """An OpenAI-compatible endpoint someone else runs."""

    kind = "openai"

    def __init__(
        self,
        config: OpenAIModelConfig,
        endpoint: EndpointConfig,
        name: str,
        guards: Guards,
        counter: TokenCounter,
        resolver: AbstractResolver | None = None,
    ) -> None:
        client = OpenAIClient(
            name,
            endpoint.base_url,
            api_key=endpoint.api_key,
            timeouts=config.timeouts,
            max_connections=config.max_connections,
            resolver=resolver,
        )
        upstream = endpoint.upstream_model or config.target_model
        super().__init__(config.name, upstream, client, counter, guards, endpoint.weight)

    async def start(self) -> None:
        await self.client.start()

    async def stop(self, grace_s: float) -> None:
        await self.client.close()
