"""The state store seam: what is kept per agent, and the protocol every store implements.

One ``AgentState`` per agent holds the agent's own data (``ctx.state``) and the supervisor's
bookkeeping for it. ``commit`` replaces the whole record atomically and durably: after a crash
the store holds either the previous record or the new one, never a mix. A PostgreSQL store
implements the same protocol with one row per agent.

Beside the agents, a store keeps named documents that belong to the supervisor as a whole (the
budget ledger's spend windows, ``"budget"``): plain JSON objects with the same atomic, durable
replacement and the same error types. Document names follow the agent-name rules, live in a
namespace of their own and are never listed by ``agents()``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

STATE_FORMAT_VERSION = 1


class ErrorEntry(BaseModel):
    """One recent error of an agent."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    at: datetime
    outcome: str
    error_type: str | None = None
    message: str


class LastRun(BaseModel):
    """Summary of the agent's most recent run."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    outcome: str
    planned_at: datetime | None = None
    started_at: datetime
    finished_at: datetime
    duration_s: float
    steps: int
    attempts: int
    error: str | None = None
    partial: Any = None
    #: what the agent returned (success only; replaced by a note when over 4 KiB as JSON)
    result: Any = None


class BreakerSnapshot(BaseModel):
    """Persisted circuit breaker state, so a restart does not reset an open circuit."""

    model_config = ConfigDict(extra="forbid")

    state: str = "closed"
    consecutive_failures: int = 0
    opened_at: datetime | None = None


class AgentState(BaseModel):
    """Everything the supervisor keeps for one agent."""

    model_config = ConfigDict(extra="forbid")

    version: int = STATE_FORMAT_VERSION
    agent: str
    data: dict[str, Any] = Field(default_factory=dict)
    last_run: LastRun | None = None
    last_success_at: datetime | None = None
    last_planned_fire: datetime | None = None
    errors: list[ErrorEntry] = Field(default_factory=list)
    totals: dict[str, int] = Field(default_factory=dict)
    breaker: BreakerSnapshot = Field(default_factory=BreakerSnapshot)
    paused: bool = False


@runtime_checkable
class StateStore(Protocol):
    """Durable per-agent state. Implementations: ``JsonFileStore`` (default), ``MemoryStore``."""

    async def open(self) -> None:
        """Prepare the store (create directories, clean stale temp files)."""
        ...

    async def close(self) -> None:
        """Release resources; pending writes are complete when this returns."""
        ...

    async def load(self, agent: str) -> AgentState:
        """Return the agent's state, or a fresh ``AgentState`` when it has none yet.

        Raises ``StateCorruptError`` when stored state exists but cannot be parsed (the stored
        data is left untouched) and ``StateError`` when it cannot be read.
        """
        ...

    async def commit(self, state: AgentState) -> None:
        """Replace the agent's state atomically and durably.

        Raises ``StateWriteError`` when the write fails; the previous state is then intact.
        """
        ...

    async def agents(self) -> list[str]:
        """Names of the agents that have stored state (documents are not agents)."""
        ...

    async def load_doc(self, name: str) -> dict[str, Any] | None:
        """Return the document ``name``, or None when it has never been committed.

        Raises ``StateCorruptError`` when the stored document is not a JSON object (it is left
        untouched) and ``StateError`` when it cannot be read or the name is unsafe.
        """
        ...

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Replace the document ``name`` atomically and durably.

        Raises ``StateWriteError`` when the write fails (the previous document is then intact)
        or when ``doc`` would not load back as written (a NaN, an object, a non-string key),
        and ``StateError`` for an unsafe name.
        """
        ...
