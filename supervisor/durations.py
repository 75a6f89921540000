"""Durations in config: ``30``, ``1.5``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: Any) -> float:
    """Seconds from a number, a ``timedelta`` or a string like ``1h30m``.

    Raises ``ValueError`` for anything else.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return float(text)
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("-")
        pos, total = 0, 0.0
        for m in _PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return sign * total
    raise ValueError(
        f"invalid duration {value!r}: use a number of seconds or e.g. 500ms, 30s, 5m, 1h"
    )


def format_duration(value: float) -> str:
    """Short human form of a number of seconds: ``90`` -> ``1m30s``."""
    if 0 < value < 1:
        return f"{value * 1000:g}ms"
    out, rest = "", value
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            n = int(rest // size)
            out += f"{n}{unit}"
            rest -= n * size
    if rest or not out:
        out += f"{rest:g}s"
    return out


#: A duration field: accepts seconds or a duration string, stored as float seconds.
Duration = Annotated[float, BeforeValidator(parse_duration)]
