"""``JsonFileStore`` on a real directory: the file format, journal commits, faults, corruption.

A commit is durable once its record is in ``journal.log``; the state files are written behind
it, so a test that looks at a file first calls ``checkpoint()`` (files written, made durable,
journal emptied). The journal itself is tested in ``test_journal.py``.

Disk faults are injected at the OS boundary: ``os.open``/``write``/``fdatasync``/``fsync`` are
wrapped so calls on the state directory fail with a chosen errno (we run as root, so file
permissions cannot make a write fail).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest

from supervisor.errors import StateCorruptError, StateError, StateWriteError
from supervisor.state import AgentState, JsonFileStore
from supervisor.state.journal import read_journal

OLD = AgentState(agent="alpha", data={"generation": "old", "text": "Grüße 🚀"}, totals={"runs": 1})
NEW = AgentState(agent="alpha", data={"generation": "new"}, paused=True)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """Where the store keeps its files (created by ``open``)."""
    return tmp_path / "state"


@pytest.fixture
async def store(directory: Path) -> JsonFileStore:
    """An opened store on ``directory``."""
    opened = JsonFileStore(directory)
    await opened.open()
    return opened


def listing(directory: Path) -> list[str]:
    """Names in ``directory``, sorted."""
    return sorted(os.listdir(directory))


def fd_path(fd: int) -> str:
    """The path an open file descriptor refers to."""
    return os.readlink(f"/proc/self/fd/{fd}")


def journal_records(directory: Path) -> list[str]:
    """Keys of the records in the journal (past them it holds only zeros, filled ahead)."""
    return [key for key, _ in read_journal((directory / "journal.log").read_bytes()).records]


def os_error(code: int, where: str = "") -> OSError:
    """An ``OSError`` as the kernel would report ``code``."""
    return OSError(code, os.strerror(code), where)


# The file format.


async def test_state_file_is_indented_sorted_utf8_json(store: JsonFileStore) -> None:
    """``<agent>.json`` is 2-space indented JSON with sorted keys, raw UTF-8 and a final newline."""
    await store.commit(OLD)
    await store.checkpoint()
    raw = store.path_for("alpha").read_bytes()
    assert (
        raw
        == orjson.dumps(
            OLD.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
    )
    text = raw.decode()
    assert text.startswith('{\n  "agent": "alpha",\n')
    assert "Grüße 🚀" in text
    assert list(orjson.loads(raw)) == sorted(orjson.loads(raw))


async def test_commits_leave_no_temp_files(store: JsonFileStore, directory: Path) -> None:
    """After commits and a checkpoint only the state files and an empty journal remain."""
    for i in range(5):
        await store.commit(AgentState(agent="alpha", data={"i": i}))
        await store.commit(AgentState(agent="beta", data={"i": i}))
    await store.checkpoint()
    assert listing(directory) == ["alpha.json", "beta.json", "journal.log"]
    assert journal_records(directory) == []
    assert (await store.load("alpha")).data == {"i": 4}


async def test_state_file_mode_is_0640(store: JsonFileStore, directory: Path) -> None:
    """State files and the journal are owner read-write, group read (less if the umask says so)."""
    await store.commit(OLD)
    await store.checkpoint()
    umask = os.umask(0)
    os.umask(umask)
    assert store.path_for("alpha").stat().st_mode & 0o777 == 0o640 & ~umask
    assert (directory / "journal.log").stat().st_mode & 0o777 == 0o640 & ~umask


# open()


async def test_open_creates_missing_directories_with_mode_0750(tmp_path: Path) -> None:
    """``open`` creates the directory and its parents; the directory gets mode 0750."""
    directory = tmp_path / "a" / "b" / "state"
    await JsonFileStore(directory).open()
    umask = os.umask(0)
    os.umask(umask)
    assert directory.is_dir()
    assert directory.stat().st_mode & 0o777 == 0o750 & ~umask


async def test_open_refuses_a_path_that_is_not_a_directory(tmp_path: Path) -> None:
    """A file where the directory should be raises ``StateError`` and is left alone."""
    target = tmp_path / "state"
    target.write_bytes(b"not a directory")
    with pytest.raises(StateError, match="is not a directory"):
        await JsonFileStore(target).open()
    assert target.read_bytes() == b"not a directory"


async def test_open_removes_stale_temp_files_only(directory: Path) -> None:
    """``open`` removes leftover write and compaction temp files and counts them; nothing else."""
    directory.mkdir()  # noqa: ASYNC240 - test setup on tmp_path, nothing else is running
    stale = [
        ".alpha.json.0123456789abcdef.tmp",
        ".beta.json.fedcba9876543210.tmp",
        ".journal.log.0123456789abcdef.tmp",
    ]
    kept = ["alpha.json", "notes.txt", ".alpha.json.swp", ".unrelated.tmp", "alpha.json.tmp"]
    for name in stale + kept:
        (directory / name).write_bytes(b"x")
    (directory / "alpha.json").write_bytes(orjson.dumps(OLD.model_dump(mode="json")))
    store = JsonFileStore(directory)
    await store.open()
    assert store.stale_temp_files_removed == 3
    assert listing(directory) == sorted(kept)
    assert await store.load("alpha") == OLD
    await store.open()
    assert store.stale_temp_files_removed == 0


# load()


CORRUPT = [
    pytest.param(b'{"agent": "alpha", "data": {', "not valid JSON", id="truncated"),
    pytest.param(b"", "file is empty (0 bytes)", id="empty"),
    pytest.param(b" \n\t", "file is empty (3 bytes)", id="whitespace-only"),
    pytest.param(b'{"agent": "\xff"}', "not valid JSON", id="not-utf8"),
    pytest.param(b"null", "does not match the state schema", id="null"),
    pytest.param(b"[]", "does not match the state schema", id="array"),
    pytest.param(
        b'{"agent": "alpha", "paused": "maybe"}', "paused: Input should be", id="bad-field"
    ),
    pytest.param(b'{"agent": "alpha", "surprise": 1}', "surprise: Extra inputs", id="extra-field"),
    pytest.param(b'{"data": {}}', "agent: Field required", id="missing-agent"),
    pytest.param(
        b'{"agent": "beta"}', "holds the state of agent 'beta', not 'alpha'", id="other-agent"
    ),
    pytest.param(b'{"agent": "alpha", "version": 2}', "version 2 is newer", id="future-version"),
    pytest.param(b'{\n  "agent": "alpha",\n  oops\n}\n', "line 3 column 3", id="line-and-column"),
]


@pytest.mark.parametrize(("raw", "message"), CORRUPT)
async def test_corrupt_file_raises_and_is_left_byte_for_byte(
    store: JsonFileStore, directory: Path, raw: bytes, message: str
) -> None:
    """An unusable file raises ``StateCorruptError`` naming it and why; the file is untouched."""
    path = store.path_for("alpha")
    path.write_bytes(raw)
    before = path.stat()
    for _ in range(2):
        with pytest.raises(StateCorruptError) as caught:
            await store.load("alpha")
        assert str(path) in str(caught.value)
        assert message in str(caught.value)
    assert path.read_bytes() == raw
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert path.stat().st_ino == before.st_ino
    assert listing(directory) == ["alpha.json"]
    await store.open()
    assert path.read_bytes() == raw


async def test_schema_errors_are_summarised(store: JsonFileStore) -> None:
    """A file with many schema errors reports the first five and how many more there are."""
    bad = {"agent": "alpha", **{f"extra{i}": i for i in range(7)}}
    store.path_for("alpha").write_bytes(orjson.dumps(bad))
    with pytest.raises(StateCorruptError, match=r"extra4: Extra inputs.* \(and 2 more\)$"):
        await store.load("alpha")


async def test_keep_corrupt_copy_saves_the_bytes_once(directory: Path) -> None:
    """With ``keep_corrupt_copy`` a corrupt file is copied beside itself once; the original stays."""
    store = JsonFileStore(directory, keep_corrupt_copy=True)
    await store.open()
    path = store.path_for("alpha")
    path.write_bytes(b'{"agent": ')
    for _ in range(3):
        with pytest.raises(StateCorruptError, match=r"a copy is kept at .*alpha\.json\.corrupt-"):
            await store.load("alpha")
    copies = [name for name in listing(directory) if name.startswith("alpha.json.corrupt-")]
    assert len(copies) == 1
    assert (directory / copies[0]).read_bytes() == b'{"agent": '
    assert path.read_bytes() == b'{"agent": '
    assert await store.agents() == ["alpha"]


async def test_keep_corrupt_copy_failure_still_reports_the_corruption(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the copy cannot be written the load still raises ``StateCorruptError`` and says so."""
    store = JsonFileStore(directory, keep_corrupt_copy=True)
    await store.open()
    store.path_for("alpha").write_bytes(b"[")
    real_open = os.open

    def refuse_temp(path: Any, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path).endswith(".tmp"):
            raise os_error(errno.ENOSPC, os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_temp)
    with pytest.raises(StateCorruptError, match=r"could not keep a copy .*\(ENOSPC\)"):
        await store.load("alpha")
    monkeypatch.undo()
    assert listing(directory) == ["alpha.json"]


async def test_unreadable_file_raises_state_error_not_corrupt(
    store: JsonFileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file that cannot be read (EACCES) raises plain ``StateError`` naming the errno."""
    await store.commit(OLD)
    await store.checkpoint()

    def denied(self: Path) -> bytes:
        raise os_error(errno.EACCES, str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(
        StateError, match=r"cannot read .*alpha.json: Permission denied \(EACCES\)"
    ) as caught:
        await store.load("alpha")
    assert type(caught.value) is StateError


async def test_directory_in_place_of_state_file_raises_state_error(store: JsonFileStore) -> None:
    """A directory named ``<agent>.json`` is unreadable state, not a new agent."""
    store.path_for("alpha").mkdir()
    with pytest.raises(StateError, match="EISDIR") as caught:
        await store.load("alpha")
    assert type(caught.value) is StateError
    assert await store.agents() == []


async def test_load_before_the_directory_exists_is_fresh(tmp_path: Path) -> None:
    """Without a directory every agent is new and ``agents()`` is empty."""
    store = JsonFileStore(tmp_path / "missing")
    assert await store.load("alpha") == AgentState(agent="alpha")
    assert await store.agents() == []


# agents()


async def test_agents_ignores_everything_but_state_files(
    store: JsonFileStore, directory: Path
) -> None:
    """Temp files, corrupt copies, hidden, odd and non-file entries are not agents."""
    await store.commit(AgentState(agent="alpha"))
    await store.checkpoint()
    for name in [
        ".alpha.json.0123456789abcdef.tmp",
        "alpha.json.corrupt-0123",
        ".hidden.json",
        "a b.json",
        "notes.txt",
        ".json",
    ]:
        (directory / name).write_bytes(b"x")
    (directory / "folder.json").mkdir()
    (directory / "linked.json").symlink_to(directory / "alpha.json")
    assert await store.agents() == ["alpha", "linked"]


# Symlinks.


async def test_symlinked_state_file_is_read_through_and_replaced_on_commit(
    store: JsonFileStore, tmp_path: Path
) -> None:
    """A symlink is read through; commit replaces the link, never writing outside the directory."""
    outside = tmp_path / "outside.json"
    outside.write_bytes(orjson.dumps(OLD.model_dump(mode="json")))
    store.path_for("alpha").symlink_to(outside)
    assert await store.load("alpha") == OLD
    await store.commit(NEW)
    await store.checkpoint()
    assert not store.path_for("alpha").is_symlink()
    assert await store.load("alpha") == NEW
    assert orjson.loads(outside.read_bytes())["data"] == {"generation": "old", "text": "Grüße 🚀"}


# Names.


@pytest.mark.parametrize(
    "name", ["../escape", "../../etc/passwd", "/tmp/abs", "sub/dir", ".alpha"], ids=repr
)
async def test_path_traversal_names_write_nothing(
    store: JsonFileStore, tmp_path: Path, name: str
) -> None:
    """A name that would leave the directory raises ``StateError`` and creates no file anywhere."""
    with pytest.raises(StateError, match="invalid agent name"):
        await store.commit(AgentState(agent=name))
    with pytest.raises(StateError, match="invalid agent name"):
        store.path_for(name)
    assert listing(tmp_path) == ["state"]
    assert listing(tmp_path / "state") == []


# Failing writes.


def is_journal(target: Any) -> bool:
    """Whether an fd or path refers to the store's journal."""
    where = fd_path(target) if isinstance(target, int) else os.fspath(target)
    return where.endswith("journal.log")


def _partial_write_then_enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls = 0

    def pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        if is_journal(fd) and any(bytes(data)):  # zero-filling the file is left alone
            calls += 1
            if calls == 1:
                return real(fd, bytes(data)[: len(data) // 2], offset)
            raise os_error(errno.ENOSPC)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def _fail_journal_call(
    name: str, code: int, times: int = 1
) -> Callable[[pytest.MonkeyPatch], None]:
    def install(monkeypatch: pytest.MonkeyPatch) -> None:
        real = getattr(os, name)
        left = times

        def fake(target: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal left
            if left and is_journal(target):
                left -= 1
                raise os_error(code, str(target))
            return real(target, *args, **kwargs)

        monkeypatch.setattr(os, name, fake)

    return install


@pytest.mark.parametrize(
    ("inject", "reason"),
    [
        pytest.param(
            _fail_journal_call("open", errno.EACCES),
            "Permission denied (EACCES)",
            id="open-journal-EACCES",
        ),
        pytest.param(
            _partial_write_then_enospc,
            "No space left on device (ENOSPC)",
            id="partial-write-ENOSPC",
        ),
        pytest.param(
            _fail_journal_call("fdatasync", errno.EIO),
            "Input/output error (EIO)",
            id="fdatasync-EIO",
        ),
    ],
)
async def test_failed_journal_write_raises_and_keeps_the_old_record(
    directory: Path,
    inject: Callable[[pytest.MonkeyPatch], None],
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A journal write failing at any step raises ``StateWriteError`` (agent, path, errno) and is
    cut back off the journal: the old record stays, now and after a restart."""
    store = JsonFileStore(directory)
    await store.open()
    await store.commit(OLD)
    await store.close()  # the journal is reopened by the next commit
    path = store.path_for("alpha")
    before = path.read_bytes()
    inject(monkeypatch)
    with pytest.raises(StateWriteError) as caught:
        await store.commit(NEW)
    monkeypatch.undo()
    message = str(caught.value)
    assert "'alpha'" in message
    assert str(path) in message
    assert reason in message
    assert "previous state is intact" in message
    assert journal_records(directory) == []
    assert await store.load("alpha") == OLD
    await store.close()
    assert path.read_bytes() == before
    assert listing(directory) == ["alpha.json", "journal.log"]
    reopened = JsonFileStore(directory)
    await reopened.open()
    assert await reopened.load("alpha") == OLD
    await reopened.commit(NEW)
    assert await reopened.load("alpha") == NEW


async def test_journal_that_cannot_be_cut_back_fails_every_later_commit(
    store: JsonFileStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a failed append cannot be undone, commits fail until a restart replays the journal."""
    await store.commit(OLD)
    _fail_journal_call("fdatasync", errno.EIO, times=2)(monkeypatch)
    with pytest.raises(StateWriteError, match=r"could not be undone .*restart"):
        await store.commit(NEW)
    monkeypatch.undo()
    with pytest.raises(StateWriteError, match="could not be undone"):
        await store.commit(AgentState(agent="beta"))
    assert await store.load("alpha") == OLD
    reopened = JsonFileStore(directory)
    await reopened.open()
    # The cut back reached the file, only its flush failed: the restart finds the old record
    # (after a power loss it could find either, whole).
    assert await reopened.load("alpha") == OLD
    await reopened.commit(AgentState(agent="beta"))
    assert await reopened.agents() == ["alpha", "beta"]


async def test_directory_fsync_failure_when_the_journal_is_created_fails_the_commit(
    store: JsonFileStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's directory entry must be durable before a record in it counts."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if fd_path(fd) == str(directory):
            raise os_error(errno.EIO)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StateWriteError, match=r"Input/output error \(EIO\).*previous state"):
        await store.commit(NEW)
    monkeypatch.undo()
    assert await store.load("alpha") == AgentState(agent="alpha")
    await store.commit(NEW)
    assert await store.load("alpha") == NEW


async def test_files_that_cannot_be_written_keep_their_records_in_the_journal(
    store: JsonFileStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the state files cannot be written the commit still succeeds (the journal has it):
    ``load`` serves it, ``checkpoint`` says why it failed, and a restart replays it."""
    await store.commit(OLD)
    await store.checkpoint()
    real = os.open

    def refuse_temp(path: Any, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path).endswith(".tmp"):
            raise os_error(errno.ENOSPC, os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_temp)
    await store.commit(NEW)
    assert await store.load("alpha") == NEW
    with pytest.raises(StateWriteError, match=r"cannot write .*alpha.json: No space left"):
        await store.checkpoint()
    monkeypatch.undo()
    assert orjson.loads(store.path_for("alpha").read_bytes())["data"] == OLD.data
    reopened = JsonFileStore(directory)
    await reopened.open()
    assert reopened.replayed == 1
    assert await reopened.load("alpha") == NEW
    assert orjson.loads(store.path_for("alpha").read_bytes())["data"] == NEW.data
    assert journal_records(directory) == []


async def test_commit_without_directory_raises_state_write_error(tmp_path: Path) -> None:
    """Committing into a directory that does not exist (no ``open``) raises ``StateWriteError``."""
    store = JsonFileStore(tmp_path / "missing")
    with pytest.raises(StateWriteError, match=r"No such file or directory \(ENOENT\)"):
        await store.commit(OLD)


# Concurrency, cancellation, close.


async def test_fifty_concurrent_commits_leave_one_valid_file(
    store: JsonFileStore, directory: Path
) -> None:
    """Fifty tasks committing one agent at once leave one complete, valid file and no temp files."""
    records = [
        AgentState(agent="alpha", data={"writer": i, "blob": f"{i:02d}" * 5000}) for i in range(50)
    ]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for record in records:
                tg.start_soon(store.commit, record)
    await store.checkpoint()
    assert AgentState.model_validate_json(store.path_for("alpha").read_bytes()) in records
    assert await store.load("alpha") in records
    assert listing(directory) == ["alpha.json", "journal.log"]


class FlushGate:
    """Holds the journal's fdatasync in its worker thread until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            if is_journal(fd):
                self.entered.set()
                assert self.release.wait(10), "test never released the flush"
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def wait_entered(self) -> None:
        """Return once a commit is inside its flush."""
        assert await anyio.to_thread.run_sync(self.entered.wait, 10)


async def test_cancelled_commit_still_completes_its_write(
    store: JsonFileStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a commit mid-flush neither tears the record nor loses it."""
    await store.commit(OLD)
    gate = FlushGate(monkeypatch)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.commit, NEW)
            await gate.wait_entered()
            tg.cancel_scope.cancel()
            gate.release.set()
    assert await store.load("alpha") == NEW
    await store.checkpoint()
    assert AgentState.model_validate_json(store.path_for("alpha").read_bytes()) == NEW
    assert listing(directory) == ["alpha.json", "journal.log"]


async def test_close_waits_for_commits_in_flight_and_writes_the_files(
    store: JsonFileStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close`` returns only after a commit already flushing has finished, files written."""
    await store.commit(OLD)
    gate = FlushGate(monkeypatch)
    closed = anyio.Event()

    async def close() -> None:
        await store.close()
        closed.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.commit, NEW)
            await gate.wait_entered()
            tg.start_soon(close)
            try:
                await anyio.wait_all_tasks_blocked()
                assert not closed.is_set()
            finally:
                gate.release.set()
            await closed.wait()
    assert await store.load("alpha") == NEW
    assert AgentState.model_validate_json(store.path_for("alpha").read_bytes()) == NEW
    assert journal_records(directory) == []
