"""Durations in config: numbers or strings like 1h30m, normalised to float seconds."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from supervisor.durations import Duration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(30, 30.0, id="int-seconds"),
        pytest.param(1.5, 1.5, id="float-seconds"),
        pytest.param(0, 0.0, id="zero"),
        pytest.param(-5, -5.0, id="negative-number-left-to-field-bounds"),
        pytest.param("45", 45.0, id="numeric-string"),
        pytest.param("2.5", 2.5, id="decimal-string"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("30s", 30.0, id="seconds"),
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("2d", 172800.0, id="days"),
        pytest.param("1h30m", 5400.0, id="compound"),
        pytest.param("1d2h3m4s500ms", 93784.5, id="every-unit"),
        pytest.param("1.5h", 5400.0, id="fractional-unit"),
        pytest.param(" 1h 30m ", 5400.0, id="spaces-ignored"),
        pytest.param("-5m", -300.0, id="negative-string"),
        pytest.param(timedelta(minutes=2), 120.0, id="timedelta"),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    """Numbers, timedeltas and unit strings become float seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("soon", id="word"),
        pytest.param("5 minutes", id="spelled-out-unit"),
        pytest.param("5M", id="upper-case-unit"),
        pytest.param("5x", id="unknown-unit"),
        pytest.param("m5", id="unit-before-number"),
        pytest.param("1h30", id="trailing-bare-number"),
        pytest.param("+5s", id="explicit-plus"),
        pytest.param("-", id="only-a-sign"),
        pytest.param(None, id="none"),
        pytest.param([30], id="list"),
    ],
)
def test_parse_duration_rejects(value: Any) -> None:
    """Anything else raises ValueError naming the value and the accepted forms."""
    with pytest.raises(ValueError, match=r"invalid duration .*use a number of seconds"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False], ids=["true", "false"])
def test_parse_duration_rejects_booleans(value: bool) -> None:
    """A YAML yes/no is not a duration, although bool is an int subclass."""
    with pytest.raises(ValueError, match="not a boolean"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(0, "0s", id="zero"),
        pytest.param(0.5, "500ms", id="sub-second"),
        pytest.param(0.0005, "0.5ms", id="sub-millisecond"),
        pytest.param(1, "1s", id="one-second"),
        pytest.param(1.5, "1.5s", id="fractional-seconds"),
        pytest.param(59, "59s", id="seconds"),
        pytest.param(60, "1m", id="one-minute"),
        pytest.param(90, "1m30s", id="minutes-and-seconds"),
        pytest.param(3600, "1h", id="one-hour"),
        pytest.param(5400, "1h30m", id="hours-and-minutes"),
        pytest.param(86400, "1d", id="one-day"),
        pytest.param(90061, "1d1h1m1s", id="every-unit"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Seconds render in the short form the config accepts."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, 0.25, 1, 42.5, 90, 3599, 5400, 86400, 93784])
def test_format_then_parse_round_trips(seconds: float) -> None:
    """What format_duration writes, parse_duration reads back to the same value."""
    assert parse_duration(format_duration(seconds)) == seconds


class _Model(BaseModel):
    timeout: Duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [pytest.param("2m", 120.0, id="string"), pytest.param(7, 7.0, id="int")],
)
def test_duration_field(value: Any, seconds: float) -> None:
    """A Duration field in a pydantic model stores float seconds."""
    assert _Model(timeout=value).timeout == seconds


def test_duration_field_error_message() -> None:
    """A bad Duration field fails validation with the operator-facing message."""
    with pytest.raises(ValidationError, match="invalid duration 'later'"):
        _Model(timeout="later")
