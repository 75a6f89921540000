"""The effects config: rate parsing, validation, and merging agent rules over top-level ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from supervisor.effects import AgentEffectsConfig, EffectsConfig, RateLimit, parse_rate
from supervisor.effects.config import resolve_policy


@pytest.mark.parametrize(
    ("text", "count", "window"),
    [
        ("5/day", 5, 86400),
        ("1/10min", 1, 600),
        ("100/h", 100, 3600),
        ("3/2h", 3, 7200),
        ("10 / 30s", 10, 30),
        ("7/week", 7, 604800),
        ("2/1.5d", 2, 129600),
    ],
)
def test_rates_parse(text: str, count: int, window: float) -> None:
    """N/<window> with an optional window count parses to count and seconds."""
    rate = parse_rate(text)
    assert (rate.count, rate.window, str(rate)) == (count, window, text.strip())


@pytest.mark.parametrize("text", ["5", "five/day", "0/day", "5/0min", "5/fortnight", "", 5])
def test_bad_rates_are_refused(text: object) -> None:
    """Anything else raises ValueError naming the accepted form."""
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_config_validates_and_serialises_rates() -> None:
    """YAML-shaped dicts validate; rates come back as their text; bad kinds are refused."""
    config = EffectsConfig.model_validate(
        {"kinds": {"post": {"rate": "5/day"}}, "approval": {"expiry": "12h"}}
    )
    rate = config.kinds["post"].rate
    assert isinstance(rate, RateLimit) and rate.count == 5
    assert config.approval.expiry == 43200
    assert config.model_dump(mode="json")["kinds"]["post"]["rate"] == "5/day"
    with pytest.raises(ValidationError):
        EffectsConfig.model_validate({"kinds": {"bad kind": {}}})
    with pytest.raises(ValidationError):
        EffectsConfig.model_validate({"kinds": {"post": {"rate": "lots"}}})
    with pytest.raises(ValidationError):
        AgentEffectsConfig.model_validate({"allow": ["post"], "typo": 1})


def test_policy_merges_agent_over_top_level_field_by_field() -> None:
    """An agent's kind entry overrides only the fields it sets; allow decides 'allowed'."""
    top = EffectsConfig.model_validate({"kinds": {"pay": {"rate": "5/day", "high_risk": True}}})
    agent = AgentEffectsConfig.model_validate(
        {"allow": ["pay"], "kinds": {"pay": {"rate": "1/day"}}}
    )
    policy = resolve_policy("pay", top, agent)
    assert policy.allowed and policy.high_risk
    assert policy.rate is not None and policy.rate.count == 1
    assert not resolve_policy("post", top, agent).allowed
    assert resolve_policy("post", top, None).allowed
    assert resolve_policy("pay", top, None).rate == parse_rate("5/day")
