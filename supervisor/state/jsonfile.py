"""The default store: one human-readable JSON file per agent, replaced atomically.

Layout of the state directory::

    <agent>.json                      the agent's state, indented, keys sorted
    _<name>.json                      a supervisor document (e.g. ``_budget.json``)
    .<agent>.json.<16 hex>.tmp        a commit in flight (a leftover one is removed by open())
    ._<name>.json.<16 hex>.tmp        a document commit in flight (removed likewise)
    <agent>.json.corrupt-<16 hex>     a copy of a corrupt file (only with keep_corrupt_copy)

Agent names start with a letter or digit, so the leading underscore keeps documents and agents
apart: no agent name maps to a document file and ``agents()`` never lists a document.

A commit writes a temp file in the same directory, fsyncs it, renames it over the state file
and fsyncs the directory, so after a crash the file holds the old record or the new one, never
a mix. A corrupt state file is never modified, renamed or deleted: it waits for a human.

Symlinks are not special: a symlinked state file is read through the link, and the next commit
replaces the link itself with a regular file, so nothing is ever written outside the directory.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from supervisor.errors import StateCorruptError, StateError, StateWriteError
from supervisor.state.base import STATE_FORMAT_VERSION, AgentState

__all__ = [
    "JsonFileStore",
    "check_agent_name",
    "check_doc_name",
    "decode_doc",
    "decode_state",
    "doc_subject",
    "encode_doc",
    "encode_state",
]

_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TEMP_NAME = re.compile(r"\._?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.json\.[0-9a-f]{16}\.tmp")
_DUMP_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
_FILE_MODE = 0o640
_DIR_MODE = 0o750
# StateError names an agent; errors about the whole directory name this placeholder.
_ALL_AGENTS = "*"


def check_agent_name(agent: str) -> str:
    """Return ``agent`` if it is safe as a file name; raise ``StateError`` if it is not."""
    if not _AGENT_NAME.fullmatch(agent):
        raise StateError(
            agent,
            "invalid agent name: use 1-128 of A-Z a-z 0-9 _ . - , starting with a letter or digit",
        )
    return agent


def doc_subject(name: str) -> str:
    """How errors about the document ``name`` identify it (``StateError`` names a subject)."""
    return f"doc:{name}"


def check_doc_name(name: str) -> str:
    """Return ``name`` if it is a safe document name; raise ``StateError`` if it is not."""
    if not _AGENT_NAME.fullmatch(name):
        raise StateError(
            doc_subject(name),
            "invalid document name: use 1-128 of A-Z a-z 0-9 _ . - , "
            "starting with a letter or digit",
        )
    return name


def encode_doc(name: str, doc: dict[str, Any]) -> bytes:
    """Serialise the document ``doc`` to the bytes of its file.

    Raises ``StateError`` for an unsafe name and ``StateWriteError`` when ``doc`` is not a
    dict or would not load back as written (a NaN or infinity, an int beyond 64 bits, a
    non-string key, an object JSON cannot hold).
    """
    subject = doc_subject(check_doc_name(name))
    if not isinstance(doc, dict):
        raise StateWriteError(subject, f"a document must be a dict, got {type(doc).__name__}")
    problem = _non_finite(doc, "")
    if problem is not None:
        # orjson writes NaN as null: the document would come back changed.
        raise StateWriteError(subject, f"document would not load back: {problem} is not finite")
    try:
        return orjson.dumps(doc, option=_DUMP_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise StateWriteError(subject, f"document is not JSON-serialisable: {exc}") from exc


def decode_doc(name: str, raw: bytes, where: str) -> dict[str, Any]:
    """Parse the stored bytes of the document ``name``.

    Raises ``StateCorruptError`` naming ``where`` when ``raw`` is not a JSON object.
    """
    try:
        return _parse_doc(raw)
    except _Unparseable as exc:
        raise StateCorruptError(doc_subject(name), f"{where}: {exc}") from exc.__cause__


def _non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinity inside ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "<root>")
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def encode_state(state: AgentState) -> bytes:
    """Serialise ``state`` to the bytes of its state file.

    Raises ``StateError`` for an unsafe agent name and ``StateWriteError`` when the state
    cannot be serialised or would not load back (a NaN where a number must be, an object in
    ``data``, a field assigned the wrong type): a record we could not read is never written.
    """
    agent = check_agent_name(state.agent)
    try:
        document = state.model_dump(mode="json", warnings="error")
        raw = orjson.dumps(document, option=_DUMP_OPTIONS)
    except (PydanticSerializationError, orjson.JSONEncodeError) as exc:
        raise StateWriteError(agent, f"state is not JSON-serialisable: {exc}") from exc
    problem = _find_problem(agent, raw)
    if problem is not None:
        raise StateWriteError(agent, f"state would not load back: {problem}")
    return raw


def decode_state(agent: str, raw: bytes, where: str) -> AgentState:
    """Parse the stored bytes of ``agent``'s state.

    Raises ``StateCorruptError`` naming ``where`` when ``raw`` is not valid JSON, does not
    match the schema, or belongs to another agent.
    """
    try:
        return _parse(agent, raw)
    except _Unparseable as exc:
        raise StateCorruptError(agent, f"{where}: {exc}") from exc.__cause__


class JsonFileStore:
    """A ``StateStore`` keeping ``<directory>/<agent>.json`` per agent.

    Blocking I/O runs in worker threads; commits of one agent are serialised. With
    ``keep_corrupt_copy`` a load that finds a corrupt file also saves a copy of its bytes
    next to it, so the evidence survives whatever a human or a policy does to the original.
    """

    def __init__(self, directory: Path | str, *, keep_corrupt_copy: bool = False) -> None:
        self.directory = Path(directory)
        self.keep_corrupt_copy = keep_corrupt_copy
        #: leftover temp files the last ``open()`` removed (each one is a commit cut short)
        self.stale_temp_files_removed = 0
        self._locks: dict[str, anyio.Lock] = {}

    def __repr__(self) -> str:
        return f"JsonFileStore({str(self.directory)!r})"

    def path_for(self, agent: str) -> Path:
        """The state file of ``agent``; raises ``StateError`` for an unsafe name."""
        return self.directory / f"{check_agent_name(agent)}.json"

    def doc_path(self, name: str) -> Path:
        """The file of the document ``name``; raises ``StateError`` for an unsafe name."""
        return self.directory / f"_{check_doc_name(name)}.json"

    async def open(self) -> None:
        """Create the directory if missing and remove temp files left by a crash.

        Raises ``StateError`` when the path exists but is not a directory, or cannot be
        created or cleaned.
        """
        self.stale_temp_files_removed = await anyio.to_thread.run_sync(self._prepare)

    async def close(self) -> None:
        """Return once every commit in flight has finished."""
        # A commit holds its agent's lock until its worker thread is done.
        for lock in list(self._locks.values()):
            async with lock:
                pass

    async def load(self, agent: str) -> AgentState:
        """Return ``agent``'s state, or a fresh one when it has no file yet.

        Raises ``StateCorruptError`` when the file exists but cannot be used (even when it is
        empty) and ``StateError`` when it cannot be read or the name is unsafe.
        """
        path = self.path_for(agent)
        return await anyio.to_thread.run_sync(self._load, agent, path)

    async def commit(self, state: AgentState) -> None:
        """Replace the agent's state file atomically and durably.

        The record written is ``state`` as it was when ``commit`` was called. Raises
        ``StateWriteError`` when the write fails (the old file is then intact, except when
        only the final directory fsync failed: the message says so) and ``StateError`` for an
        unsafe name. Once the write has started, cancelling the caller does not cut it short.
        """
        raw = encode_state(state)
        agent = state.agent
        path = self.directory / f"{agent}.json"
        lock = self._locks.get(agent)
        if lock is None:
            lock = self._locks[agent] = anyio.Lock()
        async with lock:
            # run_sync is shielded by default: a cancelled caller cannot abandon a half-made
            # temp file; the cancellation is delivered after the write finishes.
            await anyio.to_thread.run_sync(self._commit, agent, path, raw)

    async def agents(self) -> list[str]:
        """Names of the agents that have a state file, sorted; documents are not listed.

        Raises ``StateError`` when the directory cannot be listed.
        """
        return await anyio.to_thread.run_sync(self._list)

    async def load_doc(self, name: str) -> dict[str, Any] | None:
        """Return the document ``name`` (``_<name>.json``), or None when it has no file.

        Raises ``StateCorruptError`` when the file is not a JSON object (it is left untouched;
        with ``keep_corrupt_copy`` a copy is saved too) and ``StateError`` when it cannot be
        read or the name is unsafe.
        """
        path = self.doc_path(name)
        return await anyio.to_thread.run_sync(self._load_doc, name, path)

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        """Replace the document's file atomically and durably, like ``commit``.

        The document written is ``doc`` as it was when ``commit_doc`` was called. Raises
        ``StateWriteError`` when the write fails or ``doc`` would not load back, and
        ``StateError`` for an unsafe name. Cancelling the caller does not cut a write short.
        """
        raw = encode_doc(name, doc)
        path = self.doc_path(name)
        # Agent names cannot start with "_", so this key shares the lock table safely and
        # close() waits for document commits too.
        key = f"_{name}"
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        async with lock:
            await anyio.to_thread.run_sync(self._commit, doc_subject(name), path, raw)

    # Everything below runs in a worker thread.

    def _prepare(self) -> int:
        directory = self.directory
        try:
            if directory.exists() and not directory.is_dir():
                raise StateError(_ALL_AGENTS, f"state path {directory} is not a directory")
            if not directory.exists():
                directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                # Make the new directory entry itself durable.
                _fsync_directory(directory.parent)
            removed = 0
            with os.scandir(directory) as entries:
                stale = [e.path for e in entries if _TEMP_NAME.fullmatch(e.name)]
            for leftover in stale:
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    continue
                removed += 1
        except OSError as exc:
            raise StateError(
                _ALL_AGENTS, f"cannot prepare state directory {directory}: {_describe(exc)}"
            ) from exc
        return removed

    def _load(self, agent: str, path: Path) -> AgentState:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return AgentState(agent=agent)
        except OSError as exc:
            raise StateError(agent, f"cannot read {path}: {_describe(exc)}") from exc
        try:
            return _parse(agent, raw)
        except _Unparseable as exc:
            message = f"{path}: {exc}"
            if self.keep_corrupt_copy:
                message += self._keep_copy(path, raw)
            raise StateCorruptError(agent, message) from exc.__cause__

    def _load_doc(self, name: str, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(doc_subject(name), f"cannot read {path}: {_describe(exc)}") from exc
        try:
            return _parse_doc(raw)
        except _Unparseable as exc:
            message = f"{path}: {exc}"
            if self.keep_corrupt_copy:
                message += self._keep_copy(path, raw)
            raise StateCorruptError(doc_subject(name), message) from exc.__cause__

    def _keep_copy(self, path: Path, raw: bytes) -> str:
        # Named by content: loading the same corrupt file again does not pile up copies.
        copy = path.with_name(f"{path.name}.corrupt-{hashlib.sha256(raw).hexdigest()[:16]}")
        try:
            if not copy.exists():
                _replace_atomically(self.directory, copy, raw)
                _fsync_directory(self.directory)
        except OSError as exc:
            return f"; could not keep a copy at {copy}: {_describe(exc)}"
        return f"; a copy is kept at {copy}"

    def _commit(self, agent: str, path: Path, raw: bytes) -> None:
        try:
            _replace_atomically(self.directory, path, raw)
        except OSError as exc:
            raise StateWriteError(
                agent, f"cannot write {path}: {_describe(exc)}; the previous state is intact"
            ) from exc
        try:
            _fsync_directory(self.directory)
        except OSError as exc:
            raise StateWriteError(
                agent,
                f"{path} was replaced but the directory fsync failed: {_describe(exc)}; "
                "the new state may not survive a power loss",
            ) from exc

    def _list(self) -> list[str]:
        try:
            with os.scandir(self.directory) as entries:
                names = [
                    e.name[: -len(".json")]
                    for e in entries
                    if e.name.endswith(".json")
                    and _AGENT_NAME.fullmatch(e.name[: -len(".json")])
                    and e.is_file()
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(
                _ALL_AGENTS, f"cannot list state directory {self.directory}: {_describe(exc)}"
            ) from exc
        return sorted(names)


class _Unparseable(Exception):
    """Stored bytes that are not a valid record of the agent; the message says why."""


def _find_problem(agent: str, raw: bytes) -> str | None:
    try:
        _parse(agent, raw)
    except _Unparseable as exc:
        return str(exc)
    return None


def _parse(agent: str, raw: bytes) -> AgentState:
    if not raw.strip():
        raise _Unparseable(f"file is empty ({len(raw)} bytes)")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Unparseable(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    version = document.get("version") if isinstance(document, dict) else None
    # bool is an int; a newer format must not be half-understood and later overwritten.
    if isinstance(version, int) and not isinstance(version, bool):
        if version > STATE_FORMAT_VERSION:
            raise _Unparseable(
                f"state format version {version} is newer than this supervisor reads "
                f"({STATE_FORMAT_VERSION})"
            )
    try:
        state = AgentState.model_validate(document)
    except ValidationError as exc:
        raise _Unparseable(f"does not match the state schema: {_summarise(exc)}") from exc
    if state.agent != agent:
        raise _Unparseable(f"holds the state of agent {state.agent!r}, not {agent!r}")
    return state


def _parse_doc(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _Unparseable(f"file is empty ({len(raw)} bytes)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Unparseable(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(doc, dict):
        raise _Unparseable(f"a document must be a JSON object, not {type(doc).__name__}")
    return doc


def _summarise(exc: ValidationError, limit: int = 5) -> str:
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors]
    more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def _replace_atomically(directory: Path, target: Path, raw: bytes) -> None:
    """Write ``raw`` to a temp file in ``directory``, fsync it, rename it onto ``target``.

    Raises ``OSError``; the temp file is removed first when it can be.
    """
    temp = directory / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        try:
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass  # nothing more to do; open() removes it at the next start
        raise


def _write_all(fd: int, raw: bytes) -> None:
    view = memoryview(raw)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            # Would loop forever otherwise; a regular file never does this short of a fault.
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is; O_DIRECTORY is Linux/BSD.
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    if exc.errno is None:
        return str(exc)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
