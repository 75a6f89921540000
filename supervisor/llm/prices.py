"""Model prices: the bundled, dated table (``prices.json``) and the YAML overrides on top.

The budget guard needs a price before every call (the worst case is reserved up front), so a
model with no price is refused unless the config allows unpriced models. The bundled table is
a convenience with a date and a source, not an authority: providers change prices without
notice, and ``llm.models.<provider>/<model>.price`` in the config always wins.

Prices are USD per 1 million tokens. Lookup is by ``provider/model`` first; a model served by
another provider under the same name (a proxy, a gateway, a local mirror) falls back to the
highest price any provider lists for that name, so a guess errs on the expensive side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from supervisor.llm.base import Usage
from supervisor.llm.config import ModelConfig

__all__ = ["Price", "PriceTable"]

_PER = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1 million tokens; ``cached_input`` None means cached input costs full price.

    Raises ``ValueError`` for a negative or non-finite rate.
    """

    input: float
    output: float
    cached_input: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            # ``not value >= 0`` also catches NaN.
            if value is not None and (not value >= 0 or math.isinf(value)):
                raise ValueError(f"price {name} must be a finite number >= 0, got {value!r}")

    def cost(self, usage: Usage) -> float:
        """USD for the reported usage.

        ``usage.cached_input_tokens`` are part of ``input_tokens`` (the provider layer
        normalises Anthropic's separate count to this) and are billed at the cached price.
        """
        cached = min(max(usage.cached_input_tokens, 0), max(usage.input_tokens, 0))
        fresh = max(usage.input_tokens, 0) - cached
        total = (
            fresh * self.input
            + cached * _cached_rate(self)
            + max(usage.output_tokens, 0) * self.output
        )
        return total / _PER

    def worst_case(self, prompt_tokens: int, max_tokens: int) -> float:
        """USD if no prompt token is cached and the answer uses all of ``max_tokens``."""
        return (max(prompt_tokens, 0) * self.input + max(max_tokens, 0) * self.output) / _PER


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, allow_inf_nan=False)
    output: float = Field(ge=0, allow_inf_nan=False)
    cached_input: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    context: int | None = Field(default=None, ge=1)


class _TableFile(BaseModel):
    """The schema of ``prices.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    as_of: date
    source: str = Field(min_length=1)
    currency: Literal["USD"]
    unit: Literal["per 1M tokens"]
    models: dict[str, _Entry]

    @field_validator("models")
    @classmethod
    def _refs(cls, value: dict[str, _Entry]) -> dict[str, _Entry]:
        for ref in value:
            _split(ref)
        return value


def _split(ref: str) -> tuple[str, str]:
    provider, sep, model = ref.partition("/")
    if not (provider and sep and model):
        raise ValueError(f"{ref!r} is not 'provider/model'")
    return provider, model


class PriceTable:
    """Prices and context windows by ``provider/model``; immutable."""

    __slots__ = ("_by_model", "_context_by_model", "_contexts", "_prices", "as_of", "source")

    def __init__(
        self,
        prices: Mapping[str, Price],
        contexts: Mapping[str, int] | None = None,
        *,
        as_of: date | None = None,
        source: str = "",
    ) -> None:
        """Raises ``ValueError`` when a key is not ``provider/model``."""
        for ref in (*prices, *(contexts or {})):
            _split(ref)
        self._prices = dict(prices)
        self._contexts = dict(contexts or {})
        #: when the bundled prices were compiled (None for a table built by hand)
        self.as_of = as_of
        #: where the prices come from, and the warning to verify them
        self.source = source
        self._by_model = _highest_by_model(self._prices.items())
        self._context_by_model: dict[str, int] = {}
        for ref, context in self._contexts.items():
            model = _split(ref)[1]
            known = self._context_by_model.get(model)
            # The smallest window is the safe guess: what fits it fits the others.
            self._context_by_model[model] = context if known is None else min(known, context)

    @classmethod
    def bundled(cls) -> PriceTable:
        """The table shipped in ``prices.json``.

        Raises ``ValueError`` when the bundled file is invalid (a packaging bug).
        """
        return _bundled()

    @classmethod
    def from_json(cls, raw: bytes | str) -> PriceTable:
        """A table from the text of a ``prices.json``-shaped file; raises ``ValueError``."""
        try:
            parsed = _TableFile.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"invalid price table: {exc}") from exc
        prices = {ref: Price(e.input, e.output, e.cached_input) for ref, e in parsed.models.items()}
        contexts = {ref: e.context for ref, e in parsed.models.items() if e.context is not None}
        return cls(prices, contexts, as_of=parsed.as_of, source=parsed.source)

    def with_overrides(self, models: Mapping[str, ModelConfig]) -> PriceTable:
        """A new table where each configured model's price and context replace the bundled ones.

        A ``ModelConfig`` without a price (or context) keeps the table's value for it.
        """
        prices, contexts = dict(self._prices), dict(self._contexts)
        for ref, config in models.items():
            if config.price is not None:
                p = config.price
                prices[ref] = Price(p.input, p.output, p.cached_input)
            if config.context is not None:
                contexts[ref] = config.context
        return PriceTable(prices, contexts, as_of=self.as_of, source=self.source)

    def price(self, provider: str, model: str) -> Price | None:
        """The price of ``provider/model``; else the highest one listed for ``model`` under any
        provider; else None (an unpriced model)."""
        exact = self._prices.get(f"{provider}/{model}")
        return exact if exact is not None else self._by_model.get(model)

    def context(self, provider: str, model: str) -> int | None:
        """The context window in tokens, looked up like ``price`` (smallest known on fallback)."""
        exact = self._contexts.get(f"{provider}/{model}")
        return exact if exact is not None else self._context_by_model.get(model)

    def refs(self) -> list[str]:
        """Every priced ``provider/model``, sorted."""
        return sorted(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({len(self._prices)} models, as_of={self.as_of})"


def _highest_by_model(items: Iterable[tuple[str, Price]]) -> dict[str, Price]:
    """Per bare model name, the element-wise highest price any provider lists."""
    out: dict[str, Price] = {}
    for ref, price in items:
        model = _split(ref)[1]
        known = out.get(model)
        if known is None:
            out[model] = price
            continue
        out[model] = Price(
            max(known.input, price.input),
            max(known.output, price.output),
            max(_cached_rate(known), _cached_rate(price)),
        )
    return out


def _cached_rate(price: Price) -> float:
    # A listing with no cached price bills cached input at its full input price.
    return price.input if price.cached_input is None else price.cached_input


@cache
def _bundled() -> PriceTable:
    raw = resources.files("supervisor.llm").joinpath("prices.json").read_bytes()
    return PriceTable.from_json(raw)
