"""An in-memory ``EffectLedger``: the ledger for tests, ours and agent authors'.

Records are kept as the exact JSON lines ``JsonlLedger`` would append, in a ``MemoryDisk``
that outlives the ledger: ``restarted()`` builds a new ledger on the same disk, which is
what a process restart looks like (the index is lost, what was durable is replayed, every
``intent`` becomes ``unknown``). Faults are injected per write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.lowlevel

from supervisor.clock import Clock
from supervisor.effects.errors import LedgerWriteError
from supervisor.effects.ledger.base import (
    EffectRecord,
    EffectStatus,
    decode_record,
)
from supervisor.effects.ledger.indexed import IndexedLedger

__all__ = ["MemoryDisk", "MemoryLedger"]


@dataclass(slots=True)
class MemoryDisk:
    """What survives a restart: every line appended, per agent, in order."""

    lines: dict[str, list[bytes]] = field(default_factory=dict)
    #: appends made so far (each stands for one fsync of the file ledger)
    writes: int = 0


class MemoryLedger(IndexedLedger):
    """An ``EffectLedger`` in memory, with restart simulation and fault injection."""

    def __init__(self, disk: MemoryDisk | None = None, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self.disk = disk if disk is not None else MemoryDisk()
        self._faults: list[tuple[Callable[[EffectRecord], bool], BaseException | None]] = []

    def __repr__(self) -> str:
        return f"MemoryLedger(agents={sorted(self.disk.lines)!r})"

    def restarted(self) -> MemoryLedger:
        """A new, unopened ledger on the same disk: a process restart (or a crash)."""
        return MemoryLedger(self.disk, clock=self.clock)

    def fail_next_write(
        self, exc: BaseException | None = None, *, status: EffectStatus | None = None
    ) -> None:
        """Make the next write (of a record in ``status``, if given) raise ``exc`` (default
        ``LedgerWriteError``), storing nothing."""
        self._faults.append(
            ((lambda r: True) if status is None else (lambda r: r.status is status), exc)
        )

    async def _load(self) -> dict[str, list[EffectRecord]]:
        await anyio.lowlevel.checkpoint()
        return {
            agent: [decode_record(line) for line in lines]
            for agent, lines in self.disk.lines.items()
        }

    async def _persist(self, record: EffectRecord, line: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        for i, (matches, exc) in enumerate(self._faults):
            if matches(record):
                del self._faults[i]
                raise exc or LedgerWriteError(
                    record.agent, "memory ledger: failure injected by fail_next_write()"
                )
        self.disk.lines.setdefault(record.agent, []).append(line)
        self.disk.writes += 1
