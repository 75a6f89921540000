"""The ``EffectLedger`` contract on both ledgers, and the JSON-lines file's crash handling."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from supervisor.effects import (
    EffectLedger,
    EffectRecord,
    EffectStatus,
    InvalidTransition,
    JsonlLedger,
    LedgerCorruptError,
    LedgerWriteError,
    MemoryLedger,
    open_ledger,
)
from supervisor.effects.ledger.base import decode_record, encode_record
from supervisor.testing import FakeClock
from tests.effects.conftest import Ledgers

A = "publisher"


async def _run_one(ledger: EffectLedger, clock: FakeClock, key: str, result: object = None) -> None:
    """Intent then result for ``key``, as the service writes them."""
    await ledger.write_intent(A, "post", key, at=clock.now(), run_id="r1", idempotency_key="ik")
    await ledger.write_result(A, "post", key, at=clock.now(), result=result, note=None)


# -- the contract --------------------------------------------------------------------------------


async def test_intent_then_result_is_done_and_survives_restart(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """intent -> done is durable: a new ledger on the same place reads the result back."""
    ledger = await ledgers.open()
    intent = await ledger.write_intent(
        A, "post", "k1", at=clock.now(), run_id="r1", idempotency_key="ik1"
    )
    assert (intent.status, intent.attempts, intent.intent_at) == (
        EffectStatus.INTENT,
        1,
        clock.now(),
    )
    clock.advance(2)
    await ledger.write_result(A, "post", "k1", at=clock.now(), result={"id": 7}, note=None)

    again = await ledgers.open()
    record = await again.get(A, "post", "k1")
    assert record is not None
    assert (record.status, record.result, record.idempotency_key) == (
        EffectStatus.DONE,
        {"id": 7},
        "ik1",
    )
    assert record.done_at == clock.now()
    assert again.report.unknown_marked == 0


async def test_intent_without_result_is_unknown_after_restart(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """An intent with no outcome (the process died) reads unknown after open(), durably."""
    ledger = await ledgers.open()
    await ledger.write_intent(A, "post", "k1", at=clock.now(), run_id="r1", idempotency_key="ik")

    after_crash = await ledgers.open()
    record = await after_crash.get(A, "post", "k1")
    assert record is not None and record.status is EffectStatus.UNKNOWN
    assert "process stopped" in (record.error or "")
    assert after_crash.report.unknown_marked == 1

    third = await ledgers.open()
    assert third.report.unknown_marked == 0  # the unknown status itself was made durable
    record = await third.get(A, "post", "k1")
    assert record is not None and record.status is EffectStatus.UNKNOWN


async def test_a_done_effect_cannot_start_again(ledgers: Ledgers, clock: FakeClock) -> None:
    """The ledger itself refuses a second intent for a done key, and changes nothing."""
    ledger = await ledgers.open()
    await _run_one(ledger, clock, "k1")
    with pytest.raises(InvalidTransition):
        await ledger.write_intent(
            A, "post", "k1", at=clock.now(), run_id="r2", idempotency_key="ik"
        )
    record = await ledger.get(A, "post", "k1")
    assert record is not None and (record.status, record.attempts) == (EffectStatus.DONE, 1)


@pytest.mark.parametrize(
    "status", [EffectStatus.INTENT, EffectStatus.UNKNOWN], ids=["intent", "unknown"]
)
async def test_only_failed_or_approved_records_start_again(
    ledgers: Ledgers, clock: FakeClock, status: EffectStatus
) -> None:
    """An intent or unknown record cannot get a new intent; a failed one can (attempt 2)."""
    ledger = await ledgers.open()
    await ledger.write_intent(A, "post", "k1", at=clock.now(), run_id="r1", idempotency_key="ik")
    if status is EffectStatus.UNKNOWN:
        await ledger.write_failure(
            A, "post", "k1", at=clock.now(), error="boom", status=EffectStatus.UNKNOWN
        )
    with pytest.raises(InvalidTransition):
        await ledger.write_intent(
            A, "post", "k1", at=clock.now(), run_id="r2", idempotency_key="ik"
        )
    await ledger.mark(A, "post", "k1", EffectStatus.FAILED, at=clock.now())
    again = await ledger.write_intent(
        A, "post", "k1", at=clock.now(), run_id="r2", idempotency_key="ik"
    )
    assert (again.status, again.attempts, again.run_id) == (EffectStatus.INTENT, 2, "r2")


async def test_result_without_intent_is_refused(ledgers: Ledgers, clock: FakeClock) -> None:
    """A result for an effect that never started is a bug: InvalidTransition, nothing stored."""
    ledger = await ledgers.open()
    with pytest.raises(InvalidTransition):
        await ledger.write_result(A, "post", "k1", at=clock.now(), result=1, note=None)
    assert await ledger.get(A, "post", "k1") is None


async def test_failed_write_leaves_the_ledger_unchanged(clock: FakeClock) -> None:
    """A write that fails changes neither the index nor the disk."""
    ledger = MemoryLedger(clock=clock)
    await ledger.open()
    ledger.fail_next_write(status=EffectStatus.INTENT)
    with pytest.raises(LedgerWriteError):
        await ledger.write_intent(
            A, "post", "k1", at=clock.now(), run_id="r1", idempotency_key="ik"
        )
    assert await ledger.get(A, "post", "k1") is None
    assert ledger.disk.writes == 0


async def test_list_filters_and_approvals_are_found(ledgers: Ledgers, clock: FakeClock) -> None:
    """list() filters by agent and status; find_approval() finds a request after a restart."""
    ledger = await ledgers.open()
    await _run_one(ledger, clock, "k1")
    clock.advance(1)
    await ledger.mark(
        "other",
        "pay",
        "p1",
        EffectStatus.PENDING_APPROVAL,
        at=clock.now(),
        approval_id="abc123",
        requested_at=clock.now(),
        expires_at=clock.now() + timedelta(hours=1),
    )
    assert [r.key for r in await ledger.list()] == ["k1", "p1"]
    assert [r.key for r in await ledger.list(agent=A)] == ["k1"]
    assert [r.key for r in await ledger.list(status=EffectStatus.PENDING_APPROVAL)] == ["p1"]

    reopened = await ledgers.open()
    found = await reopened.find_approval("abc123")
    assert found is not None and found.ident == ("other", "pay", "p1")
    assert await reopened.find_approval("nope") is None


async def test_starts_since_counts_what_may_have_happened(
    ledgers: Ledgers, clock: FakeClock
) -> None:
    """Rate-limit counting sees done, unknown and rolled-back starts, not failed ones."""
    ledger = await ledgers.open()
    await _run_one(ledger, clock, "done")
    await ledger.write_intent(A, "post", "unk", at=clock.now(), run_id="r", idempotency_key="i")
    await ledger.write_failure(
        A, "post", "unk", at=clock.now(), error="x", status=EffectStatus.UNKNOWN
    )
    await ledger.write_intent(A, "post", "nope", at=clock.now(), run_id="r", idempotency_key="i")
    await ledger.write_failure(
        A, "post", "nope", at=clock.now(), error="x", status=EffectStatus.FAILED
    )
    await _run_one(ledger, clock, "rb")
    await ledger.mark(A, "post", "rb", EffectStatus.ROLLED_BACK, at=clock.now())
    await _run_one(ledger, clock, "other-kind")  # same kind, counted too
    since = clock.now() - timedelta(seconds=1)
    assert len(await ledger.starts_since(A, "post", since)) == 4
    assert await ledger.starts_since(A, "mail", since) == []
    clock.advance(10)
    assert await ledger.starts_since(A, "post", clock.now() - timedelta(seconds=1)) == []


def test_record_lines_round_trip() -> None:
    """encode_record / decode_record round-trip, and damaged lines say what is wrong."""
    clock = FakeClock()
    record = EffectRecord(A, "post", "k", EffectStatus.DONE, clock.now(), result={"a": [1, 2]})
    assert decode_record(encode_record(record)) == record
    for bad, why in [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"v": 99}', "newer"),
        (b'{"v": 1, "agent": "a"}', "missing"),
        (b'{"v": 1, "zzz": 1}', "unknown fields"),
    ]:
        with pytest.raises(ValueError, match=why):
            decode_record(bad)


def test_open_ledger_follows_the_state_dir(tmp_path: Path) -> None:
    """A directory or file:// gives a JsonlLedger under effects/; memory:// a MemoryLedger."""
    ledger = open_ledger(str(tmp_path))
    assert isinstance(ledger, JsonlLedger) and ledger.directory == tmp_path / "effects"
    assert isinstance(open_ledger(f"file://{tmp_path}"), JsonlLedger)
    assert isinstance(open_ledger("memory://"), MemoryLedger)
    with pytest.raises(ValueError, match="not available"):
        open_ledger("postgresql://db/x")


# -- the JSON-lines file ------------------------------------------------------------------------------


async def _jsonl(tmp_path: Path, clock: FakeClock, **options: int) -> JsonlLedger:
    ledger = JsonlLedger(tmp_path / "effects", clock=clock, **options)
    await ledger.open()
    return ledger


async def test_jsonl_syncs_twice_per_effect(tmp_path: Path, clock: FakeClock) -> None:
    """One fdatasync for the intent, one for the result (plus one directory sync when an
    agent's file is created)."""
    ledger = await _jsonl(tmp_path, clock)
    await _run_one(ledger, clock, "first")
    assert ledger.fsyncs == 3
    await _run_one(ledger, clock, "second")
    assert ledger.fsyncs == 5


async def test_torn_last_line_is_ignored_and_reported(tmp_path: Path, clock: FakeClock) -> None:
    """A half-written last line (a crash mid-append) is dropped; what came before is kept."""
    ledger = await _jsonl(tmp_path, clock)
    await _run_one(ledger, clock, "k1", result=1)
    await ledger.write_intent(A, "post", "k2", at=clock.now(), run_id="r", idempotency_key="i")
    path = ledger.path_for(A)
    good = path.read_bytes()
    # The result of k2 was being appended when the process died.
    torn = encode_record(EffectRecord(A, "post", "k2", EffectStatus.DONE, clock.now(), result=2))
    torn = torn[:25]
    path.write_bytes(good + torn)

    reopened = await _jsonl(tmp_path, clock)
    assert reopened.report.torn == {A: len(torn)}
    k1, k2 = await reopened.get(A, "post", "k1"), await reopened.get(A, "post", "k2")
    assert k1 is not None and (k1.status, k1.result) == (EffectStatus.DONE, 1)
    assert k2 is not None and k2.status is EffectStatus.UNKNOWN
    # The tail was cut off, so the next append starts on a clean line.
    assert path.read_bytes().startswith(good) and path.read_bytes().endswith(b"\n")
    assert b"k2" in path.read_bytes()
    third = await _jsonl(tmp_path, clock)
    assert third.report.torn == {} and third.report.corrupt == {}


async def test_zero_filled_tail_is_torn_not_corrupt(tmp_path: Path, clock: FakeClock) -> None:
    """Bad lines with nothing valid after them (zeros after a power loss) are a torn tail."""
    ledger = await _jsonl(tmp_path, clock)
    await _run_one(ledger, clock, "k1")
    path = ledger.path_for(A)
    path.write_bytes(path.read_bytes() + b"\0" * 100 + b"\n" + b"\0" * 50)
    reopened = await _jsonl(tmp_path, clock)
    assert reopened.report.torn == {A: 151}
    assert (await reopened.get(A, "post", "k1")) is not None


async def test_damage_before_the_end_blocks_only_that_agent(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A bad line followed by valid ones is damage: the file is left untouched and that
    agent's effects are refused; other agents carry on."""
    ledger = await _jsonl(tmp_path, clock)
    await _run_one(ledger, clock, "k1")
    await _run_one(ledger, clock, "k2")
    await ledger.write_intent("other", "post", "x", at=clock.now(), run_id="r", idempotency_key="i")
    path = ledger.path_for(A)
    lines = path.read_bytes().split(b"\n")
    lines[1] = b'{"v": 1, "garbage'
    damaged = b"\n".join(lines)
    path.write_bytes(damaged)

    reopened = await _jsonl(tmp_path, clock)
    assert A in reopened.report.corrupt and "line 2" in reopened.report.corrupt[A]
    with pytest.raises(LedgerCorruptError):
        await reopened.get(A, "post", "k1")
    with pytest.raises(LedgerCorruptError):
        await reopened.write_intent(
            A, "post", "k9", at=clock.now(), run_id="r", idempotency_key="i"
        )
    assert path.read_bytes() == damaged
    other = await reopened.get("other", "post", "x")
    assert other is not None and other.status is EffectStatus.UNKNOWN


async def test_compaction_keeps_every_record(tmp_path: Path, clock: FakeClock) -> None:
    """Past the threshold the file is rewritten with the latest record per key; replaying
    it gives back every key with its latest status and result."""
    ledger = await _jsonl(tmp_path, clock, compact_bytes=4096)
    expected: dict[str, object] = {}
    for i in range(60):
        key = f"k{i}"
        await _run_one(ledger, clock, key, result={"n": i, "pad": "x" * 40})
        expected[key] = {"n": i, "pad": "x" * 40}
        clock.advance(1)
    await ledger.write_intent(A, "post", "open", at=clock.now(), run_id="r", idempotency_key="i")
    assert ledger.compactions >= 1
    path = ledger.path_for(A)
    lines = path.read_bytes().splitlines()
    # Each key appears once per line written since the last compaction at most twice.
    assert len(lines) < 2 * 61

    reopened = await _jsonl(tmp_path, clock, compact_bytes=4096)
    for key, result in expected.items():
        record = await reopened.get(A, "post", key)
        assert record is not None and (record.status, record.result) == (EffectStatus.DONE, result)
    still_open = await reopened.get(A, "post", "open")
    assert still_open is not None and still_open.status is EffectStatus.UNKNOWN
    assert reopened.report.records == 61
    assert not [p for p in (tmp_path / "effects").iterdir() if p.name.endswith(".tmp")]


async def test_stale_compaction_temp_files_are_removed(tmp_path: Path, clock: FakeClock) -> None:
    """A temp file left by a compaction cut short is removed at open()."""
    directory = tmp_path / "effects"
    directory.mkdir()
    (directory / f".{A}.jsonl.0123456789abcdef.tmp").write_bytes(b"partial")
    ledger = await _jsonl(tmp_path, clock)
    assert ledger.report.stale_temp_files_removed == 1
    assert list(directory.iterdir()) == []


async def test_failed_append_is_cut_back(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half-way (disk full) is truncated off: the file stays valid and
    the ledger unchanged."""
    ledger = await _jsonl(tmp_path, clock)
    await _run_one(ledger, clock, "k1")
    path = ledger.path_for(A)
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 20:
            real_write(fd, bytes(data[:20]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(LedgerWriteError, match="ENOSPC"):
        await ledger.write_intent(A, "post", "k2", at=clock.now(), run_id="r", idempotency_key="i")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert await ledger.get(A, "post", "k2") is None
    await _run_one(ledger, clock, "k2")
    reopened = await _jsonl(tmp_path, clock)
    assert reopened.report.torn == {} and reopened.report.corrupt == {}


async def test_lines_are_plain_json_for_humans(tmp_path: Path, clock: FakeClock) -> None:
    """Each line is one JSON object naming agent, kind, key and status."""
    ledger = await _jsonl(tmp_path, clock)
    await _run_one(ledger, clock, "k1", result={"id": 1})
    docs = [orjson.loads(line) for line in ledger.path_for(A).read_bytes().splitlines()]
    assert [d["status"] for d in docs] == ["intent", "done"]
    assert docs[1]["key"] == "k1" and docs[1]["result"] == {"id": 1}
