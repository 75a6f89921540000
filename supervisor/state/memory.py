"""An in-memory ``StateStore``: the store for tests, ours and agent authors'.

Records are kept as the exact bytes ``JsonFileStore`` would write, so the double is no more
lenient than the real store: what fails to serialise there fails here, a ``datetime`` put in
``data`` comes back as an ISO string in both, and nothing a caller holds aliases stored data.
"""

from __future__ import annotations

from typing import Any

import anyio.lowlevel

from supervisor.errors import StateWriteError
from supervisor.state.base import AgentState
from supervisor.state.jsonfile import (
    check_agent_name,
    check_doc_name,
    decode_doc,
    decode_state,
    doc_subject,
    encode_doc,
    encode_state,
)

__all__ = ["MemoryStore"]

_WHERE = "memory store"


class MemoryStore:
    """A ``StateStore`` in a dict, with fault injection for tests."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        self._docs: dict[str, bytes] = {}
        self._fail_next = False
        self._fail_with: BaseException | None = None

    def __repr__(self) -> str:
        return f"MemoryStore(agents={sorted(self._records)!r})"

    async def open(self) -> None:
        """Nothing to prepare."""
        await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Nothing to release: commits complete before they return."""
        await anyio.lowlevel.checkpoint()

    async def load(self, agent: str) -> AgentState:
        """Return a fresh copy of ``agent``'s state, or a new ``AgentState``.

        Raises ``StateCorruptError`` after ``corrupt(agent)`` and ``StateError`` for an
        unsafe name.
        """
        check_agent_name(agent)
        await anyio.lowlevel.checkpoint()
        raw = self._records.get(agent)
        if raw is None:
            return AgentState(agent=agent)
        return decode_state(agent, raw, _WHERE)

    async def commit(self, state: AgentState) -> None:
        """Store a copy of ``state``, replacing the agent's record.

        Raises what ``fail_next_commit`` injected (the record is then unchanged),
        ``StateWriteError`` when the state cannot be serialised and ``StateError`` for an
        unsafe name.
        """
        await anyio.lowlevel.checkpoint()
        self._raise_injected(state.agent)
        self._records[state.agent] = encode_state(state)

    async def agents(self) -> list[str]:
        """Names of the agents with a record, sorted."""
        await anyio.lowlevel.checkpoint()
        return sorted(self._records)

    async def load_doc(self, name: str) -> dict[str, Any] | None:
        """Return a fresh copy of the document ``name``, or None when it was never committed.

        Raises ``StateCorruptError`` after ``corrupt_doc(name)`` and ``StateError`` for an
        unsafe name.
        """
        check_doc_name(name)
        await anyio.lowlevel.checkpoint()
        raw = self._docs.get(name)
        return None if raw is None else decode_doc(name, raw, _WHERE)

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Store a copy of ``doc`` as the document ``name``.

        Raises what ``fail_next_commit`` injected (the document is then unchanged),
        ``StateWriteError`` when ``doc`` would not load back and ``StateError`` for an unsafe
        name.
        """
        raw = encode_doc(name, doc)
        await anyio.lowlevel.checkpoint()
        self._raise_injected(doc_subject(name))
        self._docs[name] = raw

    def fail_next_commit(self, exc: BaseException | None = None) -> None:
        """Make the next ``commit`` or ``commit_doc`` raise ``exc`` (default
        ``StateWriteError``), storing nothing."""
        self._fail_next, self._fail_with = True, exc

    def corrupt_doc(self, name: str, raw: bytes = b'{"windows": ') -> None:
        """Replace the document ``name`` with ``raw`` (default: truncated JSON).

        Raises ``StateError`` for an unsafe name.
        """
        self._docs[check_doc_name(name)] = raw

    def raw_doc(self, name: str) -> bytes | None:
        """The stored bytes of the document ``name``, exactly as its file would hold them."""
        return self._docs.get(name)

    def _raise_injected(self, subject: str) -> None:
        if self._fail_next:
            exc = self._fail_with or StateWriteError(
                subject, f"{_WHERE}: failure injected by fail_next_commit()"
            )
            self._fail_next, self._fail_with = False, None
            raise exc

    def corrupt(self, agent: str, raw: bytes = b'{"agent": ') -> None:
        """Replace ``agent``'s record with ``raw`` (default: truncated JSON) so ``load`` fails.

        Raises ``StateError`` for an unsafe name.
        """
        self._records[check_agent_name(agent)] = raw

    def raw(self, agent: str) -> bytes | None:
        """The stored bytes of ``agent``'s record, exactly as a state file would hold them."""
        return self._records.get(agent)
