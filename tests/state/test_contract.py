"""The ``StateStore`` contract, run against every store.

Each store is a ``StoreKind``: how to build it in a fresh place and how to inject its
faults (corrupt stored data or a corrupt document, a failing commit). The PostgreSQL store is
one more param: it runs against the real server in a throwaway schema per test, is skipped
when the server is unreachable and fails then under ``CI=true`` (``tests/cluster/pg.py``).

Corruption is what the medium can hold: a file can be truncated, a ``jsonb`` row can only be
JSON that does not validate. So each kind names the error its corrupt record raises, and a
document corruption the medium cannot hold is skipped for that kind, saying so.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from supervisor.errors import StateCorruptError, StateError, StateWriteError
from supervisor.state import AgentState, JsonFileStore, MemoryStore, StateStore, open_store
from supervisor.state.base import BreakerSnapshot, ErrorEntry, LastRun
from tests.cluster.pg import arm_write_failure, drop_schema, execute, new_schema, require_postgres


@dataclass(frozen=True)
class StoreKind:
    """How to build one kind of store and make it fail."""

    make: Callable[[Path], StateStore]
    #: make the stored record of an agent unreadable
    corrupt: Callable[[StateStore, str], Awaitable[None]]
    #: make the next commit fail the way a full disk would
    fail_next_commit: Callable[[StateStore, pytest.MonkeyPatch], None]
    #: replace the stored document ``name`` with the given bytes
    corrupt_doc: Callable[[StateStore, str, bytes], Awaitable[None]]
    #: what the error of a record spoiled by ``corrupt`` says
    corrupt_message: str = "not valid JSON"
    #: remove what ``make`` created outside the test's temporary directory
    cleanup: Callable[[StateStore], None] | None = None


async def _corrupt_file(store: StateStore, agent: str) -> None:
    assert isinstance(store, JsonFileStore)
    # Records reach their files behind the journal: spoil the file once it holds them all.
    await store.checkpoint()
    store.path_for(agent).write_bytes(b'{"agent": ')


def _fill_disk_once(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    failed = False

    def pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal failed
        # The journal's records, not the zeros it is filled with ahead of them.
        journal = os.readlink(f"/proc/self/fd/{fd}").endswith("journal.log")
        if not failed and journal and any(bytes(data)):
            failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


async def _corrupt_doc_file(store: StateStore, name: str, raw: bytes) -> None:
    assert isinstance(store, JsonFileStore)
    await store.checkpoint()
    store.doc_path(name).write_bytes(raw)


async def _corrupt_memory_doc(store: StateStore, name: str, raw: bytes) -> None:
    assert isinstance(store, MemoryStore)
    store.corrupt_doc(name, raw)


async def _corrupt_memory(store: StateStore, agent: str) -> None:
    assert isinstance(store, MemoryStore)
    store.corrupt(agent)


def _fail_memory_once(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(store, MemoryStore)
    store.fail_next_commit()


def _make_postgres(_: Path) -> StateStore:
    from supervisor.state.postgres import PostgresStore

    return PostgresStore(require_postgres(), schema=new_schema())


def _schema_of(store: StateStore) -> str:
    from supervisor.state.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    return store.schema


async def _corrupt_row(store: StateStore, agent: str) -> None:
    # Valid JSON (jsonb holds nothing else) that is not a valid AgentState.
    bad = orjson.dumps({"version": 1, "agent": agent, "paused": "maybe"}).decode()
    execute(
        _schema_of(store), "UPDATE {s}.agents SET doc = %s::jsonb WHERE agent = %s", (bad, agent)
    )


def _fail_postgres_once(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    arm_write_failure(_schema_of(store), ("agents", "docs"))


async def _corrupt_doc_row(store: StateStore, name: str, raw: bytes) -> None:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        pytest.skip("a jsonb column cannot hold bytes that are not JSON: no such corruption")
    execute(
        _schema_of(store),
        "UPDATE {s}.docs SET doc = %s::jsonb WHERE name = %s",
        (raw.decode(), name),
    )


def _drop_postgres_schema(store: StateStore) -> None:
    drop_schema(_schema_of(store))


STORE_KINDS = [
    pytest.param(
        StoreKind(JsonFileStore, _corrupt_file, _fill_disk_once, _corrupt_doc_file), id="jsonfile"
    ),
    pytest.param(
        StoreKind(lambda _: MemoryStore(), _corrupt_memory, _fail_memory_once, _corrupt_memory_doc),
        id="memory",
    ),
    pytest.param(
        StoreKind(
            _make_postgres,
            _corrupt_row,
            _fail_postgres_once,
            _corrupt_doc_row,
            corrupt_message="does not match the state schema",
            cleanup=_drop_postgres_schema,
        ),
        id="postgresql",
    ),
]


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> StoreKind:
    """The kind of store under test."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def store(kind: StoreKind, tmp_path: Path) -> AsyncIterator[StateStore]:
    """An opened store in a fresh place, closed after the test."""
    made = kind.make(tmp_path / "state")
    try:
        await made.open()
        yield made
        await made.close()
    finally:
        if kind.cleanup is not None:
            kind.cleanup(made)


AT = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)


def full_state(agent: str = "alpha") -> AgentState:
    """A record with every field set, nested data, unicode and several kinds of datetime."""
    return AgentState(
        agent=agent,
        data={
            "nested": {"list": [1, 2.5, True, None, "x", {"deep": ["é", []]}], "empty": {}},
            "unicode": 'Grüße, 世界, 🚀, e\u0301, "quoted" \\ back\nslash',
            "big": 2**53 + 1,
            "negative": -0.125,
        },
        last_run=LastRun(
            run_id="run-7",
            outcome="failure",
            planned_at=AT - timedelta(seconds=1),
            started_at=AT,
            finished_at=AT + timedelta(seconds=2.5),
            duration_s=2.5,
            steps=4,
            attempts=2,
            error="boom",
            partial={"done": [1, 2]},
        ),
        last_success_at=datetime(2026, 3, 28, 23, 0, tzinfo=timezone(timedelta(hours=2))),
        last_planned_fire=AT - timedelta(seconds=1),
        errors=[ErrorEntry(run_id="run-7", at=AT, outcome="failure", message="bad ✗")],
        totals={"runs": 7, "failures": 1},
        breaker=BreakerSnapshot(state="open", consecutive_failures=3, opened_at=AT),
        paused=True,
    )


async def test_store_satisfies_protocol(store: StateStore) -> None:
    """Every store is a ``StateStore`` at runtime."""
    assert isinstance(store, StateStore)


async def test_load_of_unknown_agent_returns_fresh_state(store: StateStore) -> None:
    """An agent without stored state gets a new default ``AgentState``."""
    assert await store.load("newcomer") == AgentState(agent="newcomer")


async def test_commit_then_load_round_trips_every_field(store: StateStore) -> None:
    """What is committed comes back equal: nested data, unicode, aware datetimes, sub-models."""
    state = full_state()
    await store.commit(state)
    loaded = await store.load("alpha")
    assert loaded == state
    assert loaded.last_success_at == state.last_success_at
    assert loaded.last_success_at is not None and loaded.last_success_at.utcoffset() == timedelta(
        hours=2
    )


async def test_datetime_inside_data_comes_back_as_iso_string(store: StateStore) -> None:
    """``data`` holds JSON values: a datetime put there returns as its ISO 8601 string."""
    await store.commit(AgentState(agent="alpha", data={"seen": AT}))
    assert (await store.load("alpha")).data == {"seen": "2026-03-29T01:30:15.123456Z"}


async def test_commit_replaces_the_whole_record(store: StateStore) -> None:
    """A commit is a replacement, not a merge: keys and fields absent from it are gone."""
    await store.commit(full_state())
    await store.commit(AgentState(agent="alpha", data={"only": 1}))
    assert await store.load("alpha") == AgentState(agent="alpha", data={"only": 1})


async def test_agents_lists_committed_agents_only(store: StateStore) -> None:
    """``agents()`` names every agent committed, sorted; a load alone stores nothing."""
    assert await store.agents() == []
    await store.load("ghost")
    await store.commit(AgentState(agent="beta"))
    await store.commit(AgentState(agent="alpha"))
    await store.commit(AgentState(agent="beta", paused=True))
    assert await store.agents() == ["alpha", "beta"]


async def test_mutating_a_loaded_state_does_not_change_the_store(store: StateStore) -> None:
    """A loaded state is the caller's copy: nested edits reach the store only through commit."""
    await store.commit(full_state())
    loaded = await store.load("alpha")
    loaded.data["nested"]["list"].append("extra")
    loaded.data["new"] = 1
    loaded.totals["runs"] = 0
    assert await store.load("alpha") == full_state()
    await store.commit(loaded)
    assert (await store.load("alpha")).data["nested"]["list"][-1] == "extra"


async def test_mutating_a_committed_state_does_not_change_the_store(store: StateStore) -> None:
    """The record stored is the state as it was when commit was called."""
    state = full_state()
    await store.commit(state)
    state.data["nested"]["empty"]["late"] = True
    state.paused = False
    assert await store.load("alpha") == full_state()


BAD_NAMES = [
    "",
    ".hidden",
    "..",
    "../escape",
    "a/b",
    "/abs",
    "a b",
    "tab\t",
    "new\nline",
    "ünï",
    "x" * 129,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
async def test_unsafe_agent_names_are_rejected(store: StateStore, name: str) -> None:
    """Names outside ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` raise ``StateError`` on load and commit."""
    with pytest.raises(StateError, match="invalid agent name"):
        await store.load(name)
    with pytest.raises(StateError, match="invalid agent name"):
        await store.commit(AgentState(agent=name))
    assert await store.agents() == []


async def test_longest_safe_name_is_accepted(store: StateStore) -> None:
    """A 128-character name using every allowed character class works."""
    name = "A0_.-" + "z" * 123
    await store.commit(AgentState(agent=name, paused=True))
    assert (await store.load(name)).paused is True
    assert await store.agents() == [name]


async def test_corrupt_state_raises_and_other_agents_still_work(
    store: StateStore, kind: StoreKind
) -> None:
    """Corrupt stored data raises ``StateCorruptError`` on every load; other agents are unaffected."""
    await store.commit(AgentState(agent="alpha", data={"v": 1}))
    await kind.corrupt(store, "alpha")
    for _ in range(2):
        with pytest.raises(StateCorruptError, match=kind.corrupt_message):
            await store.load("alpha")
    await store.commit(AgentState(agent="beta"))
    assert await store.load("beta") == AgentState(agent="beta")


async def test_failed_commit_keeps_the_previous_record(
    store: StateStore, kind: StoreKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails raises ``StateWriteError``; the previous record is intact and usable."""
    await store.commit(full_state())
    kind.fail_next_commit(store, monkeypatch)
    with pytest.raises(StateWriteError):
        await store.commit(AgentState(agent="alpha"))
    assert await store.load("alpha") == full_state()
    await store.commit(AgentState(agent="alpha", data={"after": True}))
    assert (await store.load("alpha")).data == {"after": True}


def _nan_duration(state: AgentState) -> None:
    assert state.last_run is not None
    state.last_run.duration_s = float("nan")


def _wrong_type(state: AgentState) -> None:
    state.last_success_at = "yesterday"  # type: ignore[assignment]


def _object_in_data(state: AgentState) -> None:
    state.data["obj"] = object()


def _huge_int(state: AgentState) -> None:
    state.data["huge"] = 2**70


def _inf_duration(state: AgentState) -> None:
    assert state.last_run is not None
    state.last_run.duration_s = float("-inf")


def _newer_version(state: AgentState) -> None:
    state.version = 99


def _dict_in_errors(state: AgentState) -> None:
    state.errors.append({"run_id": "x"})  # type: ignore[arg-type]


def _text_in_totals(state: AgentState) -> None:
    state.totals["runs"] = "seven"  # type: ignore[assignment]


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(_nan_duration, id="nan-in-number-field"),
        pytest.param(_wrong_type, id="wrong-type-assigned"),
        pytest.param(_object_in_data, id="object-in-data"),
        pytest.param(_huge_int, id="int-beyond-64-bit"),
        pytest.param(_inf_duration, id="infinity-in-number-field"),
        pytest.param(_newer_version, id="format-version-too-new"),
        pytest.param(_dict_in_errors, id="dict-in-a-list-of-models"),
        pytest.param(_text_in_totals, id="text-in-an-int-map"),
    ],
)
async def test_state_that_would_not_load_back_is_refused(
    store: StateStore, spoil: Callable[[AgentState], None]
) -> None:
    """A record that could not be read back is never stored: ``StateWriteError``, old record kept."""
    await store.commit(full_state())
    state = full_state()
    spoil(state)
    with pytest.raises(StateWriteError, match="alpha"):
        await store.commit(state)
    assert await store.load("alpha") == full_state()


async def test_concurrent_commits_of_one_agent_leave_one_complete_record(
    store: StateStore,
) -> None:
    """Fifty concurrent commits of one agent all succeed and leave exactly one of their records."""
    records = [
        AgentState(agent="busy", data={"writer": i, "payload": f"{i:02d}" * 2000})
        for i in range(50)
    ]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for record in records:
                tg.start_soon(store.commit, record)
    assert await store.load("busy") in records
    assert await store.agents() == ["busy"]


async def test_commits_of_different_agents_do_not_interfere(store: StateStore) -> None:
    """Concurrent commits of different agents each land in their own record."""
    names = [f"agent-{i}" for i in range(10)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(store.commit, AgentState(agent=name, data={"me": name}))
    assert await store.agents() == names
    for name in names:
        assert (await store.load(name)).data == {"me": name}


# Documents: supervisor-wide JSON objects beside the agents (the budget ledger's windows).


def full_doc() -> dict[str, Any]:
    """A document with nested objects, lists, unicode, big ints and floats."""
    return {
        "version": 1,
        "windows": {"day": {"2026-03-29": {"usd": 12.345678901, "tokens": 2**53 + 1}}},
        "list": [1, 2.5, True, None, "x", {"deep": ["é", []]}],
        "unicode": 'Grüße, 世界, 🚀, "quoted" \\ back\nslash',
        "empty": {},
        "negative": -0.125,
    }


async def test_load_doc_of_unknown_document_is_none(store: StateStore) -> None:
    """A document never committed loads as None."""
    assert await store.load_doc("budget") is None


async def test_commit_doc_then_load_doc_round_trips(store: StateStore) -> None:
    """What is committed as a document comes back equal."""
    await store.commit_doc("budget", full_doc())
    assert await store.load_doc("budget") == full_doc()


async def test_commit_doc_replaces_the_whole_document(store: StateStore) -> None:
    """A document commit is a replacement, not a merge."""
    await store.commit_doc("budget", full_doc())
    await store.commit_doc("budget", {"only": 1})
    assert await store.load_doc("budget") == {"only": 1}


async def test_documents_are_copies_both_ways(store: StateStore) -> None:
    """Mutating a committed or a loaded document does not change the stored one."""
    doc = full_doc()
    await store.commit_doc("budget", doc)
    doc["windows"]["day"]["late"] = True
    loaded = await store.load_doc("budget")
    assert loaded == full_doc()
    loaded["list"].append("extra")
    assert await store.load_doc("budget") == full_doc()


async def test_documents_and_agents_are_separate_namespaces(store: StateStore) -> None:
    """An agent and a document of the same name do not collide; ``agents()`` lists no document."""
    await store.commit_doc("budget", {"doc": True})
    await store.commit_doc("other-doc", {"doc": 2})
    assert await store.agents() == []
    await store.commit(AgentState(agent="budget", data={"agent": True}))
    assert await store.agents() == ["budget"]
    assert await store.load_doc("budget") == {"doc": True}
    assert (await store.load("budget")).data == {"agent": True}


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
async def test_unsafe_document_names_are_rejected(store: StateStore, name: str) -> None:
    """Document names follow the agent-name rules: anything else raises ``StateError``."""
    with pytest.raises(StateError, match="invalid document name"):
        await store.load_doc(name)
    with pytest.raises(StateError, match="invalid document name"):
        await store.commit_doc(name, {})
    assert await store.agents() == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b'{"windows": ', "not valid JSON", id="truncated"),
        pytest.param(b"", "file is empty", id="empty"),
        pytest.param(b"[1, 2]", "must be a JSON object, not list", id="array"),
    ],
)
async def test_corrupt_document_raises_and_others_still_work(
    store: StateStore, kind: StoreKind, raw: bytes, message: str
) -> None:
    """A corrupt document raises ``StateCorruptError`` on every load; the rest is unaffected."""
    await store.commit_doc("budget", full_doc())
    await kind.corrupt_doc(store, "budget", raw)
    for _ in range(2):
        with pytest.raises(StateCorruptError, match=message):
            await store.load_doc("budget")
    await store.commit_doc("other", {"fine": True})
    assert await store.load_doc("other") == {"fine": True}
    await store.commit(AgentState(agent="alpha"))
    assert await store.agents() == ["alpha"]


async def test_failed_commit_doc_keeps_the_previous_document(
    store: StateStore, kind: StoreKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document commit that fails raises ``StateWriteError``; the previous one is intact."""
    await store.commit_doc("budget", full_doc())
    kind.fail_next_commit(store, monkeypatch)
    with pytest.raises(StateWriteError, match="budget"):
        await store.commit_doc("budget", {"lost": True})
    assert await store.load_doc("budget") == full_doc()
    await store.commit_doc("budget", {"after": True})
    assert await store.load_doc("budget") == {"after": True}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param({"usd": float("nan")}, "usd is not finite", id="nan"),
        pytest.param({"w": [1, {"x": float("inf")}]}, "w.1.x is not finite", id="nested-inf"),
        pytest.param({"obj": object()}, "not JSON-serialisable", id="object"),
        pytest.param({1: "int key"}, "not JSON-serialisable", id="non-string-key"),
        pytest.param({"huge": 2**70}, "not JSON-serialisable", id="int-beyond-64-bit"),
        pytest.param(["not", "a", "dict"], "must be a dict", id="not-a-dict"),
    ],
)
async def test_document_that_would_not_load_back_is_refused(
    store: StateStore, doc: Any, message: str
) -> None:
    """A document that could not come back as written raises ``StateWriteError``; old one kept."""
    await store.commit_doc("budget", full_doc())
    with pytest.raises(StateWriteError, match=message):
        await store.commit_doc("budget", doc)
    assert await store.load_doc("budget") == full_doc()


async def test_concurrent_doc_commits_leave_one_complete_document(store: StateStore) -> None:
    """Fifty concurrent commits of one document all succeed and leave exactly one of them."""
    docs = [{"writer": i, "payload": f"{i:02d}" * 2000} for i in range(50)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for doc in docs:
                tg.start_soon(store.commit_doc, "busy", doc)
    assert await store.load_doc("busy") in docs


async def test_jsonfile_document_layout(tmp_path: Path) -> None:
    """A document is ``_<name>.json``; ``open`` removes its leftover temp files; memory matches."""
    directory = tmp_path / "state"
    directory.mkdir()
    stale = directory / "._budget.json.0123456789abcdef.tmp"
    stale.write_bytes(b"x")
    files, memory = JsonFileStore(directory), MemoryStore()
    await files.open()
    assert files.stale_temp_files_removed == 1
    for target in (files, memory):
        await target.commit_doc("budget", full_doc())
    await files.checkpoint()
    assert sorted(os.listdir(directory)) == ["_budget.json", "journal.log"]
    assert files.doc_path("budget") == directory / "_budget.json"
    assert memory.raw_doc("budget") == (directory / "_budget.json").read_bytes()
    assert memory.raw_doc("nothing") is None


# MemoryStore's fault helpers beyond what the contract uses.


async def test_memory_fail_next_commit_raises_the_given_exception_once() -> None:
    """``fail_next_commit(exc)`` raises ``exc`` from the next commit only."""
    store = MemoryStore()
    store.fail_next_commit(OSError(errno.EROFS, "read-only"))
    with pytest.raises(OSError, match="read-only"):
        await store.commit(AgentState(agent="alpha"))
    assert await store.agents() == []
    await store.commit(AgentState(agent="alpha"))
    assert await store.agents() == ["alpha"]


async def test_memory_corrupt_accepts_chosen_bytes_and_raw_shows_them() -> None:
    """``corrupt(agent, raw)`` stores those bytes verbatim; ``raw`` returns what is stored."""
    store = MemoryStore()
    store.corrupt("alpha", b'{"agent": "beta"}')
    assert store.raw("alpha") == b'{"agent": "beta"}'
    with pytest.raises(StateCorruptError, match="holds the state of agent 'beta'"):
        await store.load("alpha")
    assert store.raw("nobody") is None


async def test_memory_raw_holds_the_state_file_bytes(tmp_path: Path) -> None:
    """``MemoryStore`` keeps byte-for-byte what ``JsonFileStore`` writes."""
    memory, files = MemoryStore(), JsonFileStore(tmp_path)
    await files.open()
    for target in (memory, files):
        await target.commit(full_state())
    await files.checkpoint()
    assert memory.raw("alpha") == files.path_for("alpha").read_bytes()


# Choosing a store.


@pytest.mark.parametrize(
    ("location", "directory"),
    [
        pytest.param("/var/lib/agent-supervisor", "/var/lib/agent-supervisor", id="absolute"),
        pytest.param("relative/state", "relative/state", id="relative"),
        pytest.param(Path("/srv/state"), "/srv/state", id="path-object"),
        pytest.param("file:///srv/my%20state", "/srv/my state", id="file-url"),
        pytest.param("file://localhost/srv/state", "/srv/state", id="file-url-localhost"),
        pytest.param("FILE:///srv/state", "/srv/state", id="scheme-case"),
    ],
)
def test_open_store_builds_json_file_store(location: str | Path, directory: str) -> None:
    """A directory or ``file://`` URL gives a ``JsonFileStore`` on that directory."""
    store = open_store(location)
    assert isinstance(store, JsonFileStore)
    assert store.directory == Path(directory)


def test_open_store_memory_url_builds_memory_store() -> None:
    """``memory://`` gives a fresh ``MemoryStore``."""
    assert isinstance(open_store("memory://"), MemoryStore)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        pytest.param(
            "postgresql://db/x?schema=1bad", "invalid PostgreSQL schema name", id="bad-schema"
        ),
        pytest.param("redis://localhost", "unknown state store URL scheme 'redis'", id="unknown"),
        pytest.param("file://otherhost/srv", "cannot name another host", id="remote-file"),
        pytest.param("file://", "has no path", id="file-no-path"),
        pytest.param("", "empty", id="empty"),
    ],
)
def test_open_store_refuses_what_it_cannot_build(location: str, message: str) -> None:
    """Unknown or remote locations and bad schema names raise ``ValueError`` saying why."""
    with pytest.raises(ValueError, match=message):
        open_store(location)


@pytest.mark.parametrize(
    ("location", "url", "schema"),
    [
        pytest.param(
            "postgresql://db/supervisor",
            "postgresql://db/supervisor",
            "agent_supervisor",
            id="default-schema",
        ),
        pytest.param(
            "postgres://u:pw@db:5433/s?schema=node_test&sslmode=require",
            "postgres://u:pw@db:5433/s?sslmode=require",
            "node_test",
            id="schema-param",
        ),
    ],
)
def test_open_store_postgresql_url_builds_postgres_store(
    location: str, url: str, schema: str
) -> None:
    """``postgresql://`` (or ``postgres://``) gives a ``PostgresStore``; ``schema=`` picks the
    schema and is not passed on to libpq; the password stays out of ``repr``."""
    from supervisor.state.postgres import PostgresStore

    store = open_store(location)
    assert isinstance(store, PostgresStore)
    assert (store.database.url, store.schema) == (url, schema)
    assert "pw" not in repr(store)
