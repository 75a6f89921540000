"""A real crash test: SIGKILL a process performing effects, many times, then check.

A child (``crash_effects.py``) performs effects ``k0..kN`` against a target that keeps a
receipt of every post; it is killed with SIGKILL at a random moment, restarted, killed
again, and finally run to the end. Then: no key was received twice, every effect the child
reported done is done in the ledger, every key with a ``reconcile`` is done and received
exactly once, and every key without one is done or held as unknown, never repeated.

This tests a process crash (the page cache survives), not power loss. ``EFFECTS_CRASH_KILLS``
sets the number of kills (default 12), ``EFFECTS_CRASH_SEED`` replays a sequence of delays.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from supervisor.effects import EffectRecord, EffectStatus, JsonlLedger
from tests.effects.crash_effects import receipts

REPO_ROOT = Path(__file__).resolve().parents[2]
#: effects per kill, so that every kill finds work left to interrupt
KEYS_PER_KILL = 40
MAX_KILL_DELAY_S = 0.4


def _start(directory: Path, keys: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.effects.crash_effects", str(directory), str(keys)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line == b"ready\n", f"child did not start: {line!r}"


def _reported_done(output: bytes) -> set[str]:
    return {line[5:] for line in output.decode().splitlines() if line.startswith("done ")}


async def _records(directory: Path) -> tuple[dict[str, EffectRecord], dict[str, str]]:
    ledger = JsonlLedger(directory / "effects")
    await ledger.open()
    records = {r.key: r for r in await ledger.list(agent="crashy")}
    await ledger.close()
    return records, ledger.report.corrupt


@pytest.mark.integration
def test_sigkill_at_random_moments_never_repeats_or_loses_an_effect(tmp_path: Path) -> None:
    """Kill the effect-performing process at random moments: no key is received twice, no
    completed effect is lost, interrupted ones are reconciled or held."""
    kills = int(os.environ.get("EFFECTS_CRASH_KILLS", "12"))
    seed = int(os.environ.get("EFFECTS_CRASH_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    keys = kills * KEYS_PER_KILL
    reported: set[str] = set()
    for _ in range(kills):
        child = _start(tmp_path, keys)
        _wait_ready(child)
        time.sleep(rng.uniform(0, MAX_KILL_DELAY_S))  # the child runs for real meanwhile
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        reported |= _reported_done(out)

    final = _start(tmp_path, keys)
    out, _ = final.communicate(timeout=120)
    assert final.returncode == 0 and out.endswith(b"finished\n"), f"seed {seed}"
    reported |= _reported_done(out)

    received = Counter(receipts(tmp_path))
    twice = {k: n for k, n in received.items() if n > 1}
    assert not twice, f"received more than once (seed {seed}): {twice}"

    records, corrupt = anyio.run(_records, tmp_path)
    assert corrupt == {}
    for key in reported:
        assert records[key].status is EffectStatus.DONE, f"{key} lost (seed {seed})"
    for i in range(keys):
        key, record = f"k{i}", records[f"k{i}"]
        if i % 2 == 0:
            assert record.status is EffectStatus.DONE, f"{key}: {record} (seed {seed})"
            assert received[key] == 1, f"{key} (seed {seed})"
        else:
            assert record.status in (EffectStatus.DONE, EffectStatus.UNKNOWN), f"seed {seed}"
            if record.status is EffectStatus.DONE:
                assert received[key] == 1, f"{key} (seed {seed})"
    interrupted = [r for r in records.values() if r.status is EffectStatus.UNKNOWN or r.note]
    print(f"seed {seed}: {kills} kills, {len(interrupted)} interrupted effects settled or held")
