"""Who an effect is: its stable idempotency key, the effect running in this task, and the
per-key locks that let one call at a time act on a key."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from supervisor.effects.ledger.indexed import new_lock

__all__ = ["EffectCall", "KeyLocks", "current_effect", "idempotency_key", "running"]


@dataclass(frozen=True, slots=True)
class EffectCall:
    """The effect whose ``fn`` is running in this task (see ``current_effect``)."""

    agent: str
    kind: str
    key: str
    idempotency_key: str
    #: the HTTP client should send ``Idempotency-Key: <idempotency_key>``
    idempotency_header: bool


_current: ContextVar[EffectCall | None] = ContextVar("supervisor_effect", default=None)


def current_effect() -> EffectCall | None:
    """The effect whose ``fn`` is running here, or None; ``ctx.http`` reads it to add the
    ``Idempotency-Key`` header to requests made inside an effect."""
    return _current.get()


@asynccontextmanager
async def running(call: EffectCall) -> AsyncIterator[None]:
    """Make ``call`` the current effect inside the block."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)


def idempotency_key(agent: str, kind: str, key: str) -> str:
    """A stable 32-hex-digit key for ``(agent, kind, key)``: the same across attempts, runs
    and restarts, so a target that honours ``Idempotency-Key`` dedupes too."""
    # Agent names and kinds cannot hold NUL, so the joined text is unambiguous.
    raw = "\0".join((agent, kind, key)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:32]


class KeyLocks:
    """One lock per name, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, name: Hashable) -> AsyncIterator[None]:
        """Hold the lock of ``name`` inside the block."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = [new_lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[name]
