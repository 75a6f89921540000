"""The journal behind ``JsonFileStore``: frames, torn tails, replay, group commit, write-behind.

Journals are built by hand with ``frame`` (the same function the store writes with) so each
crash shape is exact: cut inside a header, inside a body, zeros where data never landed, a
checksum that does not match, and damage followed by whole frames.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import anyio
import orjson
import pytest
from structlog.testing import capture_logs

from supervisor.errors import StateError, StateWriteError
from supervisor.state import AgentState, JsonFileStore
from supervisor.state.journal import JournalDamaged, frame, read_journal
from supervisor.state.jsonfile import encode_doc, encode_state

A1 = AgentState(agent="alpha", data={"n": 1})
A2 = AgentState(agent="alpha", data={"n": 2}, paused=True)
B1 = AgentState(agent="beta", data={"n": 1})


def rec(state: AgentState) -> bytes:
    """The frame holding ``state`` as the store writes it."""
    return frame(state.agent, encode_state(state))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """An existing, empty state directory."""
    path = tmp_path / "state"
    path.mkdir()
    return path


# Frames.


def test_frames_read_back_in_order() -> None:
    """Whole frames come back as (key, bytes) in journal order, documents included."""
    doc = encode_doc("budget", {"usd": 1.5})
    data = rec(A1) + rec(B1) + frame("_budget", doc) + rec(A2)
    found = read_journal(data)
    assert found.records == [
        ("alpha", encode_state(A1)),
        ("beta", encode_state(B1)),
        ("_budget", doc),
        ("alpha", encode_state(A2)),
    ]
    assert (found.end, found.torn_bytes) == (len(data), 0)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda f: f[:5], id="cut-in-header"),
        pytest.param(lambda f: f[: f.index(b"\n") + 1], id="header-only"),
        pytest.param(lambda f: f[:-3], id="cut-in-body"),
        pytest.param(lambda f: f[:-2] + b"!}", id="checksum-mismatch"),
        pytest.param(lambda f: b"\0" * len(f), id="zeros"),
        pytest.param(lambda f: f[:-3] + b"\0" * 4096, id="cut-then-zeros"),
    ],
)
def test_torn_tail_is_dropped(tail: object) -> None:
    """A last frame that is incomplete or fails its checksum was never acknowledged: dropped."""
    whole = rec(A1) + rec(B1)
    torn = tail(rec(A2))  # type: ignore[operator]
    found = read_journal(whole + torn)
    assert [key for key, _ in found.records] == ["alpha", "beta"]
    # Zeros are the space filled ahead of the records: only other bytes count as torn.
    assert (found.end, found.torn_bytes) == (len(whole), len(torn) - torn.count(0))


def test_zeros_after_the_records_are_their_end_not_a_tear() -> None:
    """The zero-filled space ahead of the records reads as the end of the journal."""
    data = rec(A1) + bytes(4096)
    found = read_journal(data)
    assert [key for key, _ in found.records] == ["alpha"]
    assert (found.end, found.torn_bytes) == (len(rec(A1)), 0)


def test_damage_followed_by_a_whole_frame_is_reported_not_dropped() -> None:
    """A bad frame with a good one after it means acknowledged records: ``JournalDamaged``."""
    bad = bytearray(rec(B1))
    bad[-5] ^= 0xFF
    data = rec(A1) + bytes(bad) + rec(A2)
    with pytest.raises(JournalDamaged, match=f"byte {len(rec(A1))} is damaged"):
        read_journal(data)


# Replay at open().


async def test_open_replays_the_newest_record_of_each_file(directory: Path) -> None:
    """Records in the journal win over older files; the newest per file; journal emptied."""
    (directory / "alpha.json").write_bytes(encode_state(A1))
    doc = {"usd": 2.0}
    (directory / "journal.log").write_bytes(
        rec(A1) + rec(B1) + rec(A2) + frame("_budget", encode_doc("budget", doc))
    )
    store = JsonFileStore(directory)
    with capture_logs() as logs:
        await store.open()
    assert store.replayed == 3
    assert [e["event"] for e in logs] == ["state.journal_replayed"]
    assert AgentState.model_validate_json((directory / "alpha.json").read_bytes()) == A2
    assert AgentState.model_validate_json((directory / "beta.json").read_bytes()) == B1
    assert orjson.loads((directory / "_budget.json").read_bytes()) == doc
    assert (directory / "journal.log").stat().st_size == 0
    assert await store.load("alpha") == A2
    assert await store.load_doc("budget") == doc
    assert await store.agents() == ["alpha", "beta"]


async def test_open_drops_a_torn_tail_and_says_so(directory: Path) -> None:
    """A torn last frame is cut off the journal (and logged); the whole ones are replayed."""
    journal = directory / "journal.log"
    journal.write_bytes(rec(A1) + rec(A2)[:-10])
    store = JsonFileStore(directory)
    with capture_logs() as logs:
        await store.open()
    torn = [e for e in logs if e["event"] == "state.journal_torn_tail"]
    assert torn and torn[0]["dropped_bytes"] == len(rec(A2)) - 10
    assert store.torn_bytes == len(rec(A2)) - 10
    assert await store.load("alpha") == A1
    assert journal.stat().st_size == 0


async def test_open_refuses_a_journal_damaged_before_its_end(directory: Path) -> None:
    """Damage with whole frames after it raises ``StateError`` and leaves every byte alone."""
    bad = bytearray(rec(A1))
    bad[-5] ^= 0xFF
    data = bytes(bad) + rec(B1)
    (directory / "journal.log").write_bytes(data)
    with pytest.raises(StateError, match="damaged but a whole frame follows"):
        await JsonFileStore(directory).open()
    assert (directory / "journal.log").read_bytes() == data
    assert sorted(os.listdir(directory)) == ["journal.log"]


async def test_replay_over_a_corrupt_file_keeps_a_copy_first(directory: Path) -> None:
    """Replay writes a newer committed record over a corrupt file, after keeping its bytes."""
    (directory / "alpha.json").write_bytes(b'{"agent": ')
    (directory / "journal.log").write_bytes(rec(A2))
    store = JsonFileStore(directory)
    with capture_logs() as logs:
        await store.open()
    [warning] = [e for e in logs if e["event"] == "state.replay_replaced_corrupt_file"]
    assert "not valid JSON" in warning["problem"]
    copies = [n for n in os.listdir(directory) if n.startswith("alpha.json.corrupt-")]
    assert len(copies) == 1
    assert (directory / copies[0]).read_bytes() == b'{"agent": '
    assert await store.load("alpha") == A2


async def test_replay_of_a_record_already_in_its_file_writes_nothing_new(directory: Path) -> None:
    """When the file already holds the record (written behind before the crash) it is kept."""
    (directory / "alpha.json").write_bytes(encode_state(A2))
    inode = (directory / "alpha.json").stat().st_ino
    (directory / "journal.log").write_bytes(rec(A1) + rec(A2))
    store = JsonFileStore(directory)
    await store.open()
    assert (directory / "alpha.json").stat().st_ino == inode
    assert sorted(os.listdir(directory)) == ["alpha.json", "journal.log"]
    assert await store.load("alpha") == A2


# Commits and the files behind them.


async def test_a_commit_is_served_before_its_file_is_written(directory: Path) -> None:
    """Until written behind, a committed record is served from memory and listed."""
    store = JsonFileStore(directory, write_behind=3600, checkpoint_interval=3600)
    await store.open()
    await store.commit(A1)
    assert not (directory / "alpha.json").exists()
    assert await store.load("alpha") == A1
    assert await store.agents() == ["alpha"]
    found = read_journal((directory / "journal.log").read_bytes())
    assert found.records == [("alpha", encode_state(A1))]
    await store.close()
    assert AgentState.model_validate_json((directory / "alpha.json").read_bytes()) == A1


async def test_write_behind_thread_writes_checkpoints_and_stops_when_idle(directory: Path) -> None:
    """The store's thread writes the files, empties the journal when due, then exits."""
    store = JsonFileStore(directory, write_behind=0, checkpoint_interval=0)
    await store.open()
    await store.commit(A1)
    await store.commit_doc("budget", {"usd": 1.0})
    writer = store._writer
    if writer is not None:
        await anyio.to_thread.run_sync(writer.join, 10)
        assert not writer.is_alive()
    assert AgentState.model_validate_json((directory / "alpha.json").read_bytes()) == A1
    assert orjson.loads((directory / "_budget.json").read_bytes()) == {"usd": 1.0}
    assert (directory / "journal.log").stat().st_size == 0


async def test_journal_past_checkpoint_bytes_is_compacted(directory: Path) -> None:
    """A checkpoint keeps only records newer than it; a restart replays just those."""
    store = JsonFileStore(directory, write_behind=3600, checkpoint_interval=3600)
    await store.open()
    await store.commit(A1)
    await store.checkpoint()
    await store.commit(B1)
    found = read_journal((directory / "journal.log").read_bytes())
    assert [key for key, _ in found.records] == ["beta"]
    reopened = JsonFileStore(directory)
    await reopened.open()
    assert reopened.replayed == 1
    assert await reopened.load("alpha") == A1
    assert await reopened.load("beta") == B1


async def test_concurrent_commits_share_flushes(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty agents committing at once cost a few journal flushes, not fifty."""
    store = JsonFileStore(directory)
    await store.open()
    real = os.fdatasync
    flushes = 0

    def counting(fd: int) -> None:
        nonlocal flushes
        flushes += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    states = [AgentState(agent=f"agent-{i:02d}", data={"i": i}) for i in range(50)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for state in states:
                tg.start_soon(store.commit, state)
    assert flushes <= 3
    assert [await store.load(s.agent) for s in states] == states


async def test_a_failed_flush_fails_every_commit_of_its_batch(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits that shared a failed flush all raise; the flush is undone; the next ones work."""
    store = JsonFileStore(directory)
    await store.open()
    await store.commit(A1)
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()
    calls = 0

    def gated(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first flush waits while the next batch fills
            entered.set()
            assert release.wait(10)
        elif calls == 2:  # the second batch's flush fails; its undo (call 3) works
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", gated)
    errors: list[str] = []

    async def commit(state: AgentState) -> None:
        try:
            await store.commit(state)
        except StateWriteError as exc:
            errors.append(exc.agent)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, AgentState(agent="gamma"))
            assert await anyio.to_thread.run_sync(entered.wait, 10)
            tg.start_soon(commit, A2)
            tg.start_soon(commit, B1)
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert sorted(errors) == ["alpha", "beta"]
    monkeypatch.setattr(os, "fdatasync", real)
    assert await store.load("alpha") == A1
    assert await store.agents() == ["alpha", "gamma"]
    await store.commit(B1)
    assert await store.load("beta") == B1
    found = read_journal((directory / "journal.log").read_bytes())
    assert [key for key, _ in found.records] == ["alpha", "gamma", "beta"]
