"""Structured logs: one JSON object per line on stdout, with secrets taken out.

Every line carries ``ts`` (ISO 8601, UTC), ``level``, ``event`` and whatever context is bound:
``bind_run`` binds ``agent`` and ``run_id`` through contextvars, so every line logged while a
run is in flight, from any module, names the run. Lines from stdlib logging (APScheduler,
uvicorn) at WARNING and above go through the same processors to the same stream.

The ``Redactor`` runs last before rendering: values under sensitive keys (at any depth),
registered secret values, ``Bearer`` tokens and ``sk-`` API keys inside any string become
``[REDACTED]``. Objects that JSON cannot encode natively are turned into strings and redacted
while rendering, so nothing reaches the stream unredacted.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "Redactor",
    "bind_run",
    "configure_logging",
    "get_logger",
]

REDACTED = "[REDACTED]"

#: key names whose values are always redacted, compared lower-cased with "-" read as "_"
SENSITIVE_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "client_secret",
        "authorization",
        "password",
        "passwd",
        "cookie",
        "set_cookie",
        "x_api_key",
    }
)

#: registered secrets shorter than this are ignored: they would shred ordinary text
MIN_SECRET_LENGTH = 6

# Most values in a log line recur (event names, outcomes, agent names): strings up to this
# long are redacted once and looked up afterwards, in a table of at most _CACHE_SIZE entries
# that starts over when full or when a secret is added.
_CACHE_MAX_LEN = 128
_CACHE_SIZE = 4096
# Added by our own processors just before the redactor, and never holding a secret.
_GENERATED_KEYS = frozenset({"ts", "level"})

# Deeper than this a value is not walked but replaced; it also breaks reference cycles.
_MAX_DEPTH = 32
_TRUNCATED = "[TRUNCATED]"

# Always on, secrets registered or not. The bearer group keeps the scheme so the line still
# says what kind of credential was there.
_STATIC_PATTERNS = (
    r"(?P<bearer>\b(?i:bearer)\s+)[A-Za-z0-9\-._~+/]+=*",
    r"\bsk-[A-Za-z0-9_\-]{16,}",
)

# Dataclasses go through ``default`` so their fields are redacted like dict values; non-str
# keys would otherwise make orjson raise in the middle of a log call.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _compile(secrets: Iterable[str]) -> re.Pattern[str]:
    # Longest first: when one secret contains another, the whole of the longer one goes.
    literals = [re.escape(s) for s in sorted(secrets, key=len, reverse=True)]
    return re.compile("|".join([*_STATIC_PATTERNS, *literals]))


def _replace(match: re.Match[str]) -> str:
    bearer = match.group("bearer")
    return f"{bearer}{REDACTED}" if bearer else REDACTED


_SENSITIVE: dict[str, bool] = {}


def _is_sensitive(key: object) -> bool:
    if not isinstance(key, str):
        return False
    known = _SENSITIVE.get(key)
    if known is None:
        known = key.lower().replace("-", "_") in SENSITIVE_KEYS
        if len(_SENSITIVE) >= _CACHE_SIZE:
            _SENSITIVE.clear()
        _SENSITIVE[key] = known
    return known


class Redactor:
    """A structlog processor that takes secrets out of every event dict.

    The input's nested containers are never mutated; redacted copies replace them.
    """

    __slots__ = ("_lock", "_secrets", "_state")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        # The pattern and the table of texts redacted with it, swapped as one.
        self._state: tuple[re.Pattern[str], dict[str, str]] = (_compile(()), {})
        self.add_secrets(secrets)

    @property
    def secret_count(self) -> int:
        """How many secret values are registered."""
        return len(self._secrets)

    def add_secrets(self, values: Iterable[str]) -> None:
        """Register secret values to redact from every string; short or empty ones are ignored.

        Secrets are never unregistered: a rotated-out key is still a secret.
        """
        new = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
        with self._lock:
            if new <= self._secrets:
                return
            self._secrets |= new
            # One combined pattern, swapped in whole with a fresh table, so a concurrent log
            # call sees either the old pair or the new one.
            self._state = (_compile(self._secrets), {})

    def redact_text(self, text: str) -> str:
        """``text`` with every secret, bearer token and ``sk-`` key replaced."""
        pattern, done = self._state
        if len(text) > _CACHE_MAX_LEN:
            return pattern.sub(_replace, text)
        redacted = done.get(text)
        if redacted is None:
            redacted = pattern.sub(_replace, text)
            if len(done) >= _CACHE_SIZE:
                done.clear()
            done[text] = redacted
        return redacted

    def redact(self, value: Any) -> Any:
        """A redacted copy of ``value`` (dicts, lists and tuples walked at any depth)."""
        return self._scrub(value, 0)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        # The event dict is a fresh copy per call, so its top level may be changed in place.
        for key, value in event_dict.items():
            if isinstance(value, str):
                if key not in _GENERATED_KEYS:
                    event_dict[key] = REDACTED if _is_sensitive(key) else self.redact_text(value)
            elif _is_sensitive(key):
                event_dict[key] = REDACTED
            elif not isinstance(value, int | float | None):
                event_dict[key] = self._scrub(value, 1)
        return event_dict

    def json_default(self, obj: Any) -> Any:
        """orjson ``default``: what JSON cannot encode natively, made into redacted data."""
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return self._scrub(obj, 1)
        to_structlog = getattr(obj, "__structlog__", None)
        text = to_structlog() if callable(to_structlog) else repr(obj)
        return self._scrub(text, 1)

    def _scrub(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, int | float | None):
            return value
        if depth >= _MAX_DEPTH:
            return _TRUNCATED
        if isinstance(value, dict):
            return {
                k: REDACTED if _is_sensitive(k) else self._scrub(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub(v, depth + 1) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            # As a dict, so that its fields are redacted by name like any other key.
            return self._scrub(dataclasses.asdict(value), depth)
        return value


class _JSONRenderer:
    """Renders an event dict as one line of JSON bytes with orjson; never raises."""

    __slots__ = ("_redactor",)

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> bytes:
        try:
            return self._dumps(event_dict)
        except orjson.JSONEncodeError as exc:
            # A log call must never break the code that logs (an int past 64 bits, a lone
            # surrogate): keep the line, with each value that cannot be encoded as text.
            safe = {_safe_text(k): self._encodable(v) for k, v in event_dict.items()}
            safe["log_error"] = _safe_text(str(exc))
            return self._dumps(safe)

    def _dumps(self, value: Any) -> bytes:
        return orjson.dumps(value, default=self._redactor.json_default, option=_ORJSON_OPTIONS)

    def _encodable(self, value: Any) -> Any:
        try:
            self._dumps(value)
        except orjson.JSONEncodeError:
            return _safe_text(self._redactor.redact_text(repr(value)))
        return value

    def render_str(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        """The same line as text, for ``ProcessorFormatter`` (which must end in a string)."""
        return self(logger, method_name, event_dict).decode("utf-8")


def _safe_text(value: object) -> str:
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


class _JSONLineHandler(logging.Handler):
    """Writes stdlib records, rendered by ``ProcessorFormatter``, as lines on a binary stream."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8") + b"\n"
            # One write per line, as structlog's BytesLogger does, so that the lines of the two
            # writers sharing the stream never interleave.
            self._stream.write(line)
            self._stream.flush()
        except Exception:
            self.handleError(record)


# The one redactor: a reload adds secrets to it, and every logger sees them at once.
_REDACTOR = Redactor()
_handler: _JSONLineHandler | None = None
_configure_lock = threading.Lock()


def configure_logging(
    level: str = "info", stream: BinaryIO | None = None, secrets: Iterable[str] = ()
) -> None:
    """Send structlog and stdlib logging (WARNING+) to ``stream`` (stdout) as JSON lines.

    Safe to call again, e.g. on reload: the new level and stream replace the old ones and
    ``secrets`` are added to those already registered. Raises ``ValueError`` on an unknown
    level name.
    """
    try:
        min_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}"
        ) from None
    out = stream if stream is not None else sys.stdout.buffer
    _REDACTOR.add_secrets(secrets)
    renderer = _JSONRenderer(_REDACTOR)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    with _configure_lock:
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                timestamper,
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                _REDACTOR,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(min_level),
            logger_factory=_SharedFactory(structlog.BytesLogger(out)),
            context_class=dict,
            # Not cached: a logger cached on first use would keep the level and stream of the
            # configuration it was first used under, and a reload could not change them.
            cache_logger_on_first_use=False,
        )
        _route_stdlib(out, max(logging.WARNING, min_level), renderer, timestamper)


class _SharedFactory:
    """A logger factory handing out one output logger: loggers are not cached (see below),
    so each log call asks the factory again, and building a ``BytesLogger`` per line costs."""

    __slots__ = ("_logger",)

    def __init__(self, logger: structlog.BytesLogger) -> None:
        self._logger = logger

    def __call__(self, *args: Any) -> structlog.BytesLogger:
        return self._logger


def _route_stdlib(
    out: BinaryIO, level: int, renderer: _JSONRenderer, timestamper: Processor
) -> None:
    global _handler
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _REDACTOR,
            renderer.render_str,
        ],
    )
    handler = _JSONLineHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger with ``bound`` on every line it writes (plus the bound context)."""
    logger: FilteringBoundLogger = structlog.get_logger(**bound)
    return logger


class bind_run:
    """Put ``agent`` and ``run_id`` on every line logged inside; restore the previous on exit."""

    # A class rather than a generator-based context manager: it is entered on every run.
    __slots__ = ("_tokens", "_values")

    def __init__(self, agent: str, run_id: str) -> None:
        self._values = {"agent": agent, "run_id": run_id}
        self._tokens: Mapping[str, Any] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._values)

    def __exit__(self, *exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)
