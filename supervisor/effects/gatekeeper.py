"""The gatekeeper's checks, as plain functions: the request, the params before, the rate
window, the output after, and what of a result the ledger can keep.

Each returns what is wrong (or raises ``ValueError``/``TypeError`` for params) and leaves
the refusing, counting and logging to ``EffectsService``.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import BaseModel

from supervisor.effects.config import KIND_PATTERN, RateLimit
from supervisor.effects.ledger.base import json_fits

__all__ = [
    "MAX_KEY_CHARS",
    "PARAMS_SUMMARY_CHARS",
    "check_params",
    "describe",
    "maybe_await",
    "output_problem",
    "rate_retry_after",
    "request_problem",
    "storable",
]

#: params shown to an approver are cut to this many characters of JSON
PARAMS_SUMMARY_CHARS = 4000
MAX_KEY_CHARS = 1024
_KIND = re.compile(KIND_PATTERN)


def request_problem(kind: Any, key: Any) -> str | None:
    """Why ``kind`` or ``key`` cannot be recorded, or None."""
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        return f"kind {kind!r} must match {KIND_PATTERN}"
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        return f"key must be a non-empty string of at most {MAX_KEY_CHARS} characters"
    return None


async def check_params(params: Any, validate: Any) -> tuple[Any, str]:
    """Validate ``params``; return what an approver sees (JSON, bounded) and a fingerprint.

    ``validate`` is None, a pydantic model class, or a callable (sync or async) returning
    False to refuse. Raises ``ValueError`` or ``TypeError`` (pydantic's ``ValidationError``
    is a ``ValueError``) when the params are refused.
    """
    value = params
    if isinstance(validate, type) and issubclass(validate, BaseModel):
        value = validate.model_validate(params)
    elif validate is not None and await maybe_await(validate(params)) is False:
        raise ValueError("the validate hook refused them")
    shown = plain(value)
    try:
        text = orjson.dumps(shown, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        text = repr(shown).encode()
        shown = text.decode()
    fingerprint = hashlib.sha256(text).hexdigest()
    if len(text) > PARAMS_SUMMARY_CHARS:
        shown = text[:PARAMS_SUMMARY_CHARS].decode(errors="replace") + " ...(cut)"
    return shown, fingerprint


def rate_retry_after(rate: RateLimit, starts: list[datetime], now: datetime) -> float | None:
    """None when the window has room for one more; else the seconds until it has.

    ``starts`` are the start times inside the window, oldest first.
    """
    if len(starts) < rate.count:
        return None
    # Room appears when enough of the oldest starts have left the window.
    frees_at = starts[len(starts) - rate.count] + timedelta(seconds=rate.window)
    return max(0.0, (frees_at - now).total_seconds())


async def output_problem(check_result: Any, result: Any) -> str | None:
    """Why ``result`` fails ``check_result`` (False returned, or an exception), or None."""
    try:
        verdict = await maybe_await(check_result(result))
    except Exception as exc:
        return describe(exc)
    return "check_result returned False" if verdict is False else None


def storable(result: Any, max_bytes: int) -> tuple[Any, str | None]:
    """What of ``result`` the ledger keeps (JSON within ``max_bytes``), and a note when it
    keeps nothing."""
    value = plain(result)
    try:
        raw = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        return None, f"result not kept: not JSON ({exc})"
    why = json_fits(value)
    if why is not None:
        return None, f"result not kept: {why}"
    if len(raw) > max_bytes:
        return None, (
            f"result not kept: {len(raw)} bytes of JSON, over max_result_bytes ({max_bytes})"
        )
    return value, None


def plain(value: Any) -> Any:
    """A pydantic model as its JSON dict; anything else as is."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


async def maybe_await(value: Any) -> Any:
    """``value``, awaited first when it is awaitable (hooks may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for records and logs."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
