"""The effect ledger seam: one durable record per ``(agent, kind, key)``, and its life cycle.

    (none) ──request──> pending_approval ──approve──> approved ──┐
       │                    │  └──reject/expire──> rejected/expired (final)
       │                    └──────────────────────────────────────┐
       ├──────────────────────────────────────────────────────────┴─> intent ──result──> done
       │                                                              │  (durable before fn)
    failed <──EffectNotStarted / reconciled "did not happen"────────┤
       └──(may start again)                                          └──fn raised, cancelled,
                                                                        process died──> unknown
    done ──output check failed──> rolled_back | check_failed
    unknown ──reconcile / human──> done | failed

Every write is durable when the method returns, and the in-memory view changes only after
it is: a failed write leaves the ledger as it was. ``open()`` turns every ``intent`` left by
a previous process into ``unknown`` (the process died between intent and result) and makes
that durable too. A write that would break the life cycle raises ``InvalidTransition``:
the ledger itself refuses to start an effect twice, whatever its caller does.

``IndexedLedger`` (``indexed.py``) implements the protocol over an in-memory index.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import orjson

__all__ = [
    "COUNTED_BY_RATE_LIMITS",
    "LEDGER_FORMAT_VERSION",
    "EffectLedger",
    "EffectRecord",
    "EffectStatus",
    "OpenReport",
    "decode_record",
    "encode_record",
]

LEDGER_FORMAT_VERSION = 1


class EffectStatus(StrEnum):
    """Where one effect is in its life cycle."""

    #: high risk: a durable request waits for a human; nothing has happened
    PENDING_APPROVAL = "pending_approval"
    #: a human approved it; it runs when the agent next asks for it, before ``expires_at``
    APPROVED = "approved"
    #: durable intent written, ``fn`` running now (after a restart this reads ``unknown``)
    INTENT = "intent"
    #: ``fn`` returned; ``result`` holds what it returned (as JSON)
    DONE = "done"
    #: known not to have happened (``EffectNotStarted``, reconcile or a human said so);
    #: the next call may start it again
    FAILED = "failed"
    #: may or may not have happened (``fn`` raised or was cancelled, or the process died);
    #: never started again on its own
    UNKNOWN = "unknown"
    #: a human rejected it; never runs
    REJECTED = "rejected"
    #: the approval was not given, or not used, in time; never runs
    EXPIRED = "expired"
    #: it ran, failed the output check, and the rollback hook undid it
    ROLLED_BACK = "rolled_back"
    #: it ran and failed the output check; no rollback, or the rollback failed: a human looks
    CHECK_FAILED = "check_failed"


#: statuses of effects that may have reached the target: they count against rate limits
COUNTED_BY_RATE_LIMITS = frozenset(
    {
        EffectStatus.INTENT,
        EffectStatus.DONE,
        EffectStatus.UNKNOWN,
        EffectStatus.ROLLED_BACK,
        EffectStatus.CHECK_FAILED,
    }
)


@dataclass(frozen=True, slots=True)
class EffectRecord:
    """What the ledger knows about one ``(agent, kind, key)``. Times are UTC."""

    agent: str
    kind: str
    key: str
    status: EffectStatus
    #: when this record was last written
    updated_at: datetime
    #: the run that last touched it
    run_id: str | None = None
    #: how many times ``fn`` was started for this key
    attempts: int = 0
    #: when the last start was recorded (rate limits count from here)
    intent_at: datetime | None = None
    #: when the outcome was recorded (result, failure, reconcile, rollback)
    done_at: datetime | None = None
    #: what ``fn`` returned, as JSON (None when it did not fit or was not JSON)
    result: Any = None
    #: why the last attempt failed or the output check refused it
    error: str | None = None
    #: a human-readable remark (who resolved it, why a result was not kept, ...)
    note: str | None = None
    #: the stable key passed to ``fn`` (an ``Idempotency-Key`` for targets that dedupe)
    idempotency_key: str | None = None
    #: the approval request of a high-risk effect
    approval_id: str | None = None
    #: the params as shown to the approver (JSON, bounded)
    params: Any = None
    #: sha256 of the full params: an approval covers exactly these params
    params_fingerprint: str | None = None
    #: why the agent wants it (shown to the approver)
    reason: str | None = None
    requested_at: datetime | None = None
    #: a pending request must be decided, and an approved one run, before this
    expires_at: datetime | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.agent, self.kind, self.key)

    def approval_usable(self, now: datetime) -> bool:
        """True when a human approved this effect and the approval may still be used."""
        return (
            self.decided_at is not None
            and self.status in (EffectStatus.APPROVED, EffectStatus.FAILED)
            and self.expires_at is not None
            and now < self.expires_at
        )

    def to_doc(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (fields that are None are left out)."""
        doc: dict[str, Any] = {"v": LEDGER_FORMAT_VERSION}
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        doc["status"] = self.status.value
        return doc


_FIELD_NAMES = tuple(f.name for f in fields(EffectRecord))
_DATETIME_FIELDS = frozenset(
    {"updated_at", "intent_at", "done_at", "requested_at", "expires_at", "decided_at"}
)
_STR_FIELDS = frozenset(
    {
        "agent",
        "kind",
        "key",
        "run_id",
        "error",
        "note",
        "idempotency_key",
        "approval_id",
        "params_fingerprint",
        "reason",
        "decided_by",
    }
)
_KNOWN_FIELDS = frozenset(f.name for f in fields(EffectRecord))
_REQUIRED_FIELDS = ("agent", "kind", "key", "status", "updated_at")


def encode_record(record: EffectRecord) -> bytes:
    """One JSON line (newline included). Raises ``TypeError`` when a field is not JSON."""
    try:
        return orjson.dumps(record.to_doc(), option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"effect record is not JSON-serialisable: {exc}") from exc


def decode_record(raw: bytes | str) -> EffectRecord:
    """Parse one JSON line. Raises ``ValueError`` saying what is wrong with it."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"a record must be a JSON object, not {type(doc).__name__}")
    version = doc.pop("v", None)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"bad record format version {version!r}")
    if version > LEDGER_FORMAT_VERSION:
        raise ValueError(
            f"record format version {version} is newer than this supervisor reads "
            f"({LEDGER_FORMAT_VERSION})"
        )
    unknown = set(doc) - _KNOWN_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    missing = [name for name in _REQUIRED_FIELDS if name not in doc]
    if missing:
        raise ValueError(f"missing fields {missing}")
    values = {name: _FIELD_PARSERS.get(name, _as_is)(name, value) for name, value in doc.items()}
    return EffectRecord(**values)


def _as_is(name: str, value: Any) -> Any:
    return value


def _parse_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _parse_status(name: str, value: Any) -> EffectStatus:
    try:
        return EffectStatus(value)
    except ValueError:
        raise ValueError(f"unknown status {value!r}") from None


def _parse_count(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0")
    return value


def _parse_time(name: str, value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be an ISO time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} is not an ISO time: {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{name} has no timezone: {value!r}")
    return parsed


_FIELD_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    **dict.fromkeys(_DATETIME_FIELDS, _parse_time),
    **dict.fromkeys(_STR_FIELDS, _parse_str),
    "status": _parse_status,
    "attempts": _parse_count,
}


def json_fits(value: Any) -> str | None:
    """Why ``value`` would not round-trip through the ledger's JSON, or None when it would."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        return str(exc)
    if _has_non_finite(value):
        return "it holds NaN or infinity"
    return None


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


@dataclass(slots=True)
class OpenReport:
    """What ``open()`` found and repaired."""

    #: records replayed (latest version of each key)
    records: int = 0
    #: intents without an outcome, now durable as ``unknown``
    unknown_marked: int = 0
    #: agents whose file ended in a torn (half-written) line, and the bytes dropped
    torn: dict[str, int] = field(default_factory=dict)
    #: agents whose ledger is corrupt before its end, and why (their effects are refused)
    corrupt: dict[str, str] = field(default_factory=dict)
    #: temp files of an interrupted compaction that were removed
    stale_temp_files_removed: int = 0


@runtime_checkable
class EffectLedger(Protocol):
    """Durable effect records. Implementations: ``JsonlLedger`` (default), ``MemoryLedger``.

    Every write method is durable when it returns and raises ``InvalidTransition`` (ledger
    unchanged) when the record's life cycle does not allow it, ``LedgerWriteError`` when
    the write fails (ledger unchanged) and ``LedgerCorruptError`` when the agent's ledger
    could not be read at ``open()``.
    """

    report: OpenReport

    async def open(self) -> None:
        """Replay what is durable; every ``intent`` becomes ``unknown`` (durably)."""
        ...

    async def close(self) -> None:
        """Return once every write in flight has finished; later writes raise."""
        ...

    async def get(self, agent: str, kind: str, key: str) -> EffectRecord | None:
        """The record of ``(agent, kind, key)``, or None when the key was never used."""
        ...

    async def write_intent(
        self,
        agent: str,
        kind: str,
        key: str,
        *,
        at: datetime,
        run_id: str,
        idempotency_key: str,
        params_fingerprint: str | None = None,
    ) -> EffectRecord:
        """Record that ``fn`` is about to start (from no record, ``failed`` or ``approved``)."""
        ...

    async def write_result(
        self, agent: str, kind: str, key: str, *, at: datetime, result: Any, note: str | None
    ) -> EffectRecord:
        """Record ``fn``'s result: ``intent`` -> ``done``. ``result`` must be JSON."""
        ...

    async def write_failure(
        self,
        agent: str,
        kind: str,
        key: str,
        *,
        at: datetime,
        error: str,
        status: EffectStatus,
    ) -> EffectRecord:
        """Record that ``fn`` raised: ``intent`` -> ``failed`` (nothing happened) or
        ``unknown`` (it may have)."""
        ...

    async def mark(
        self,
        agent: str,
        kind: str,
        key: str,
        status: EffectStatus,
        *,
        at: datetime,
        **changes: Any,
    ) -> EffectRecord:
        """Move the record to ``status`` (approval, reconcile, rollback, human resolution),
        setting the other fields given in ``changes``."""
        ...

    async def list(
        self, agent: str | None = None, status: EffectStatus | None = None
    ) -> builtins.list[EffectRecord]:
        """Records, optionally of one agent and/or one status, oldest update first."""
        ...

    async def find_approval(self, approval_id: str) -> EffectRecord | None:
        """The record carrying ``approval_id``, or None."""
        ...

    async def starts_since(self, agent: str, kind: str, since: datetime) -> builtins.list[datetime]:
        """Start times after ``since`` of ``agent``'s effects of ``kind`` that may have
        happened (statuses in ``COUNTED_BY_RATE_LIMITS``), oldest first."""
        ...
