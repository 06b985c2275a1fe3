"""The price catalog: what one request or run step costs, in USD.

Two kinds of price, added together when a model has both:

- **Tokens** (API models): `input_usd_per_mtok`, `output_usd_per_mtok` and `cached_input_usd_per_mtok`
  (prompt tokens the provider served from its prompt cache; null: the input price) per million tokens.
  `cached_tokens` are a part of `prompt_tokens`, as in OpenAI's `prompt_tokens_details.cached_tokens`.
- **Busy time** (self-hosted models): `gpu_usd_per_hour` is what the GPUs of one deployment (replica) cost
  per hour. Each request pays `gpu_usd_per_hour / 3600 x busy_s`, where `busy_s` is its share of the
  deployment's time: at every instant the time is split equally among the requests in flight on that
  deployment (processor sharing, see `strata.cost.gpu_time`). The shares of all requests add up to the
  time the deployment was busy; idle time is charged to nobody, so a report's total is the bill of the
  GPUs' busy hours.

Shipped default for the embedded model (llama.cpp on CPU, no GPU): `cost.embedded_usd_per_hour`, $0.18 an
hour — about four on-demand cloud vCPUs at $0.045 each, what the llama.cpp threads keep busy — charged like a
GPU hour. SmolLM2-135M answers a short prompt in well under a second, so a request costs some millionths of
a dollar: small, but not zero, so usage reports and budgets work out of the box. A model's own
`gpu_usd_per_hour` overrides it; set it to 0 to make the embedded model free.

A model the catalog does not know (removed by a hot swap, a typo) costs 0.

One path for every model call: a client's chat completion and an agent run's model step are both described
by a `ModelUse` (tokens and busy time) and priced by `PriceCatalog.charge`, so the same work costs the same
whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from strata.config import EmbeddedModelConfig, ModelConfig, StrataConfig

_PER_MTOK = 1e-6
_PER_HOUR = 1 / 3600


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    cached_input_usd_per_mtok: float | None = None  # None: the input price
    usd_per_busy_hour: float = 0.0  # one deployment's GPUs (or CPUs), per hour of its time

    @classmethod
    def of(cls, model: ModelConfig, embedded_usd_per_hour: float = 0.0) -> ModelPrice:
        hourly = model.gpu_usd_per_hour
        if hourly is None:
            hourly = embedded_usd_per_hour if isinstance(model, EmbeddedModelConfig) else 0.0
        return cls(
            input_usd_per_mtok=model.input_usd_per_mtok,
            output_usd_per_mtok=model.output_usd_per_mtok,
            cached_input_usd_per_mtok=model.cached_input_usd_per_mtok,
            usd_per_busy_hour=hourly,
        )

    @property
    def is_free(self) -> bool:
        return not (
            self.input_usd_per_mtok
            or self.output_usd_per_mtok
            or self.cached_input_usd_per_mtok
            or self.usd_per_busy_hour
        )

    @property
    def charges_busy_time(self) -> bool:
        """Callers need to measure the request's busy time (`strata.cost.gpu_time`) only when this is set."""
        return self.usd_per_busy_hour > 0

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, busy_s: float = 0.0) -> float:
        prompt = max(0, prompt_tokens)
        cached = min(max(0, cached_tokens), prompt)
        cached_price = self.cached_input_usd_per_mtok
        if cached_price is None:
            cached_price = self.input_usd_per_mtok
        tokens = (
            (prompt - cached) * self.input_usd_per_mtok
            + cached * cached_price
            + max(0, completion_tokens) * self.output_usd_per_mtok
        ) * _PER_MTOK
        return tokens + max(0.0, busy_s) * self.usd_per_busy_hour * _PER_HOUR


FREE = ModelPrice()


@dataclass(frozen=True, slots=True)
class ModelUse:
    """What one model call used, as priced: tokens (`cached_tokens` are a part of `prompt_tokens`) and its
    share of the deployment's busy time (`strata.cost.gpu_time`), for a chat completion and a run step alike."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    busy_s: float = 0.0


class PriceCatalog:
    """Model name -> price. Replace a model's entry when it is hot-swapped with new prices (`set`)."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None, *, embedded_usd_per_hour: float = 0.0) -> None:
        self._prices = dict(prices or {})
        self.embedded_usd_per_hour = embedded_usd_per_hour

    @classmethod
    def from_config(cls, config: StrataConfig) -> PriceCatalog:
        hourly = config.cost.embedded_usd_per_hour
        return cls({m.name: ModelPrice.of(m, hourly) for m in config.models}, embedded_usd_per_hour=hourly)

    def price(self, model: str) -> ModelPrice:
        return self._prices.get(model, FREE)

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, busy_s: float = 0.0
    ) -> float:
        return self.price(model).cost(prompt_tokens, completion_tokens, cached_tokens, busy_s)

    def charge(self, use: ModelUse) -> float:
        """The cost in USD of one model call: the one pricing path of chat completions and run steps."""
        return self.cost(use.model, use.prompt_tokens, use.completion_tokens, use.cached_tokens, use.busy_s)

    def charges_busy_time(self, model: str) -> bool:
        return self.price(model).charges_busy_time

    def set(self, model: ModelConfig) -> None:
        """A model (re)deployed with this config: its prices from now on."""
        self._prices[model.name] = ModelPrice.of(model, self.embedded_usd_per_hour)

    def update(self, models: Iterable[ModelConfig]) -> None:
        """After a config reload: the models' prices, and nothing for models no longer configured."""
        self._prices = {m.name: ModelPrice.of(m, self.embedded_usd_per_hour) for m in models}

    @property
    def unpriced(self) -> list[str]:
        """Models every request of which costs 0: worth a line in the start-up log."""
        return sorted(name for name, price in self._prices.items() if price.is_free)

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def items(self) -> list[tuple[str, ModelPrice]]:
        return sorted(self._prices.items())
