"""Price table: the bundled file, lookups and fallbacks, overrides, cost arithmetic."""

from __future__ import annotations

import math
from datetime import date
from importlib import resources

import orjson
import pytest

from supervisor.llm.base import Usage
from supervisor.llm.config import ModelConfig, PriceConfig
from supervisor.llm.prices import Price, PriceTable

MINI = Price(input=0.15, output=0.6, cached_input=0.075)


def test_bundled_table_is_dated_and_says_to_verify() -> None:
    """The shipped table carries its date, currency, unit and a warning to verify prices."""
    table = PriceTable.bundled()
    assert table.as_of == date(2026, 11, 1)
    assert "verify" in table.source and "override" in table.source
    raw = orjson.loads(resources.files("supervisor.llm").joinpath("prices.json").read_bytes())
    assert (raw["currency"], raw["unit"]) == ("USD", "per 1M tokens")
    assert table.refs() == sorted(raw["models"])


@pytest.mark.parametrize(
    "ref",
    [
        "openai/gpt-4o",
        "openai/gpt-4o-mini",
        "openai/gpt-4.1",
        "openai/gpt-4.1-mini",
        "anthropic/claude-sonnet-4-5",
        "anthropic/claude-haiku-4-5",
        "groq/llama-3.3-70b-versatile",
        "groq/llama-3.1-8b-instant",
        "minimax/MiniMax-M2.5",
        "openrouter/openai/gpt-4o-mini",
        "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    ],
)
def test_bundled_table_prices_the_common_models(ref: str) -> None:
    """Each common model has a positive price and a context window."""
    provider, _, model = ref.partition("/")
    table = PriceTable.bundled()
    price = table.price(provider, model)
    assert price is not None and price.input > 0 and price.output > 0
    assert (table.context(provider, model) or 0) >= 8192


def test_exact_reference_wins() -> None:
    """``provider/model`` is looked up first."""
    table = PriceTable({"openai/gpt-4o-mini": MINI, "proxy/gpt-4o-mini": Price(9, 9)})
    assert table.price("openai", "gpt-4o-mini") == MINI


def test_unknown_provider_falls_back_to_the_highest_price_for_the_model() -> None:
    """Another provider serving the same model name gets the element-wise highest listed price."""
    table = PriceTable(
        {
            "a/m": Price(input=1.0, output=10.0, cached_input=0.1),
            "b/m": Price(input=2.0, output=5.0),
        },
        {"a/m": 8000, "b/m": 4000},
    )
    # b lists no cached price: cached input bills at its input price, 2.0.
    assert table.price("local", "m") == Price(input=2.0, output=10.0, cached_input=2.0)
    assert table.context("local", "m") == 4000


def test_gateway_model_names_keep_their_slashes() -> None:
    """``openrouter/openai/gpt-4o-mini`` is provider ``openrouter``, model ``openai/gpt-4o-mini``."""
    table = PriceTable.bundled()
    assert table.price("openrouter", "openai/gpt-4o-mini") == MINI
    assert table.price("my-gateway", "openai/gpt-4o-mini") == MINI


def test_unknown_model_is_unpriced() -> None:
    """A model no provider lists has no price and no context."""
    table = PriceTable.bundled()
    assert table.price("openai", "gpt-99") is None
    assert table.context("openai", "gpt-99") is None


def test_overrides_replace_price_and_context_and_keep_the_rest() -> None:
    """Config overrides win; a ModelConfig without a price keeps the bundled price."""
    table = PriceTable.bundled().with_overrides(
        {
            "groq/llama-3.3-70b-versatile": ModelConfig(price=PriceConfig(input=1.0, output=2.0)),
            "openai/gpt-4o-mini": ModelConfig(context=4096),
            "local/qwen3": ModelConfig(price=PriceConfig(input=0, output=0), context=32768),
        }
    )
    assert table.price("groq", "llama-3.3-70b-versatile") == Price(1.0, 2.0)
    assert table.price("openai", "gpt-4o-mini") == MINI
    assert table.context("openai", "gpt-4o-mini") == 4096
    assert table.price("local", "qwen3") == Price(0.0, 0.0)
    assert table.context("local", "qwen3") == 32768
    assert table.as_of == PriceTable.bundled().as_of
    assert PriceTable.bundled().price("local", "qwen3") is None  # the original is unchanged


def test_cost_bills_cached_input_at_the_cached_price() -> None:
    """Cached input tokens (part of input_tokens) at the cached rate; the rest at full price."""
    usage = Usage(input_tokens=1_000_000, output_tokens=500_000, cached_input_tokens=400_000)
    assert MINI.cost(usage) == pytest.approx(0.6 * 0.15 + 0.4 * 0.075 + 0.5 * 0.6)
    no_cache_price = Price(input=1.0, output=2.0)
    assert no_cache_price.cost(usage) == pytest.approx(1.0 + 1.0)


def test_cost_clamps_a_cached_count_above_the_input_count() -> None:
    """A provider reporting more cached than input tokens is not billed below zero."""
    usage = Usage(input_tokens=100, output_tokens=0, cached_input_tokens=500)
    assert MINI.cost(usage) == pytest.approx(100 * 0.075 / 1e6)


def test_worst_case_bills_every_prompt_token_at_full_price() -> None:
    """Worst case = all prompt tokens at the input price + max_tokens at the output price."""
    assert MINI.worst_case(10_000, 2_000) == pytest.approx((10_000 * 0.15 + 2_000 * 0.6) / 1e6)
    assert MINI.worst_case(0, 0) == 0.0
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cached_input_tokens=10_000)
    assert MINI.cost(usage) <= MINI.worst_case(10_000, 2_000)


@pytest.mark.parametrize(
    ("input_", "output", "cached"),
    [(-1.0, 1.0, None), (1.0, math.nan, None), (1.0, 1.0, math.inf)],
    ids=["negative", "nan", "inf"],
)
def test_invalid_price_is_rejected(input_: float, output: float, cached: float | None) -> None:
    """A negative, NaN or infinite rate is a ValueError."""
    with pytest.raises(ValueError, match="finite number >= 0"):
        Price(input_, output, cached)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"as_of": "2026-11-01", "source": "x", "currency": "EUR", "unit": "per 1M tokens", "models": {}}',
        b'{"as_of": "2026-11-01", "source": "x", "currency": "USD", "unit": "per 1M tokens", "models": {"nomodel": {"input": 1, "output": 1}}}',
        b'{"as_of": "2026-11-01", "source": "x", "currency": "USD", "unit": "per 1M tokens", "models": {"a/b": {"input": -1, "output": 1}}}',
        b"not json",
    ],
    ids=["currency", "bad-ref", "negative", "not-json"],
)
def test_invalid_table_file_is_rejected(raw: bytes) -> None:
    """A malformed price file raises ValueError rather than pricing anything wrongly."""
    with pytest.raises(ValueError, match="invalid price table"):
        PriceTable.from_json(raw)


def test_table_keys_must_name_a_provider() -> None:
    """A key without ``provider/`` is a ValueError."""
    with pytest.raises(ValueError, match="not 'provider/model'"):
        PriceTable({"gpt-4o": MINI})
