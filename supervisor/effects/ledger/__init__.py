"""Effect ledgers: the ``EffectLedger`` protocol, its ledgers, and ``open_ledger`` to pick one.

``open_ledger`` follows the state store's ``state_dir``:

    /var/lib/agent-supervisor, file:///...     JsonlLedger in <state_dir>/effects/ (default)
    memory://                                  MemoryLedger (tests, dry runs)
    postgresql://...                           refused: with ``store: postgresql://`` the daemon
                                               builds a ``PostgresLedger`` on the node's pool
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from supervisor.clock import Clock
from supervisor.effects.ledger.base import (
    COUNTED_BY_RATE_LIMITS,
    EffectLedger,
    EffectRecord,
    EffectStatus,
    OpenReport,
)
from supervisor.effects.ledger.jsonl import DEFAULT_COMPACT_BYTES, JsonlLedger
from supervisor.effects.ledger.memory import MemoryDisk, MemoryLedger

__all__ = [
    "COUNTED_BY_RATE_LIMITS",
    "EffectLedger",
    "EffectRecord",
    "EffectStatus",
    "JsonlLedger",
    "MemoryDisk",
    "MemoryLedger",
    "OpenReport",
    "open_ledger",
]

#: the ledger's directory under the state directory
LEDGER_SUBDIR = "effects"


def open_ledger(
    state_dir: str | Path,
    *,
    clock: Clock | None = None,
    compact_bytes: int = DEFAULT_COMPACT_BYTES,
) -> EffectLedger:
    """Build the ledger for ``state_dir``; the caller still awaits its ``open()``.

    Raises ``ValueError`` for the locations ``supervisor.state.open_store`` refuses.
    """
    if isinstance(state_dir, Path):
        return JsonlLedger(state_dir / LEDGER_SUBDIR, clock=clock, compact_bytes=compact_bytes)
    if not state_dir:
        raise ValueError("the state directory is empty")
    if "://" not in state_dir:
        return JsonlLedger(
            Path(state_dir) / LEDGER_SUBDIR, clock=clock, compact_bytes=compact_bytes
        )
    url = urlsplit(state_dir)
    scheme = url.scheme.lower()
    if scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path:
            raise ValueError(f"not a local file:// URL: {state_dir!r}")
        return JsonlLedger(
            Path(unquote(url.path)) / LEDGER_SUBDIR, clock=clock, compact_bytes=compact_bytes
        )
    if scheme == "memory":
        return MemoryLedger(clock=clock)
    if scheme in ("postgresql", "postgres"):
        raise ValueError(
            "the PostgreSQL effect ledger is not available through state_dir: set "
            "store: postgresql://... (the daemon then builds it on the node's pool)"
        )
    raise ValueError(f"unknown state URL scheme {url.scheme!r} in {state_dir!r}")
