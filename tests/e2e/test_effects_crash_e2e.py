"""SIGKILL the real daemon at random moments while its agents perform side effects.

Four ``batch_poster`` agents (two with a ``reconcile`` that asks the target, two without)
post batches of keys every 0.05 s to ``EffectTarget``, a loopback server in the test process
that records every request and answers 10 ms after recording it, so that many kills land
between "the target has it" and "the daemon recorded the result". Each round starts the
daemon, kills it with SIGKILL 0-0.3 s after ``daemon.ready``, and reads its ledger files;
a last round runs until every agent has finished two runs and stops it with SIGTERM.

Checked:
- no key is ever delivered twice (the target counts every POST by Idempotency-Key);
- no completed effect is lost: every key the daemon logged ``executed`` or reconciled is
  ``done`` in the ledger; every key the target received is ``done`` or ``unknown``;
- every interrupted effect (its last ledger line ``intent`` at the kill) is ``unknown`` when
  the next daemon is ready (``effects.ledger_recovered`` counts exactly those), and ends
  reconciled (``done``, delivered exactly once) for the agents with a reconcile, or held
  (``unknown``, ``effect.held_unknown`` logged, delivered at most once) for the others.

This is a process crash (the page cache survives), not a power loss.

    .venv/bin/pytest tests/e2e/test_effects_crash_e2e.py                          # 100 kills
    EFFECTS_E2E_KILLS=1000 .venv/bin/pytest tests/e2e/test_effects_crash_e2e.py   # 1,000

``EFFECTS_E2E_SEED`` replays a sequence of kill delays (the seed is printed on failure).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from supervisor.effects import EffectRecord, EffectStatus, idempotency_key
from supervisor.effects.ledger.base import decode_record
from tests.e2e.conftest import Daemon, Line, fleet_config
from tests.e2e.effect_target import EffectTarget, running_target

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

KILLS = int(os.environ.get("EFFECTS_E2E_KILLS", "100"))
RECONCILING = ("rec0", "rec1")
HOLDING = ("hold0", "hold1")
PER_RUN = 4
MAX_KILL_DELAY_S = 0.3


def _config(state_dir: Path, url: str) -> str:
    agents = [
        {
            "name": name,
            "run": "effect_agents:batch_poster",
            "schedule": "every 0.05s",
            "params": {"url": url, "per_run": PER_RUN, "reconcile": name in RECONCILING},
            "guards": {"timeout": "10s", "retry": {"attempts": 1}, "circuit": {"failures": 0}},
        }
        for name in RECONCILING + HOLDING
    ]
    return fleet_config(
        yaml.safe_dump({"agents": agents}, sort_keys=False),
        state_dir=str(state_dir),
        max_concurrent_runs=8,
        # Keep every line: the checks read each key's whole history.
        effects={"ledger": {"compact_bytes": 1 << 40}},
    )


def _read_ledger(state_dir: Path) -> dict[tuple[str, str], list[EffectRecord]]:
    """Every record line per (agent, key), in write order; a torn last line is skipped."""
    history: dict[tuple[str, str], list[EffectRecord]] = {}
    for path in sorted((state_dir / "effects").glob("*.jsonl")):
        lines = path.read_bytes().split(b"\n")
        for n, line in enumerate(lines):
            if not line:
                continue
            try:
                record = decode_record(line)
            except ValueError:
                assert n == len(lines) - 1, f"{path}: bad line {n + 1} before the end"
                continue  # torn by the kill; the next open() drops it
            history.setdefault((record.agent, record.key), []).append(record)
    return history


@dataclass
class Observed:
    """What the rounds saw, gathered for the final checks and the summary line."""

    executed: set[tuple[str, str]] = field(default_factory=set)
    reconciled: set[tuple[str, str]] = field(default_factory=set)
    held: set[tuple[str, str]] = field(default_factory=set)
    #: interrupted effects: last ledger line ``intent`` right after a kill (with its index)
    interrupted: set[tuple[str, str]] = field(default_factory=set)
    intent_lines: set[tuple[tuple[str, str], int]] = field(default_factory=set)
    #: ... of which the target already had the POST (the incident's window)
    interrupted_delivered: int = 0
    torn: int = 0
    ready_s: list[float] = field(default_factory=list)

    def collect(self, lines: list[Line]) -> None:
        for line in lines:
            event, key, agent = line.get("event"), line.get("key"), line.get("agent")
            if key is None or agent is None:
                continue
            if event == "effect.executed":
                self.executed.add((agent, key))
            elif event == "effect.reconciled_done":
                self.reconciled.add((agent, key))
            elif event == "effect.held_unknown":
                self.held.add((agent, key))


def _recovered_unknown(d: Daemon) -> int:
    """How many intents the daemon's ledger turned into ``unknown`` at start (0 if none)."""
    for line in d.lines:
        if line.get("event") == "effects.ledger_recovered":
            assert line["corrupt"] == {}, line
            return int(line["unknown"])
        if line.get("event") == "daemon.ready":
            break
    return 0


def _delivered(target: EffectTarget) -> Counter[str]:
    """POSTs per Idempotency-Key; fails at once when one was delivered twice."""
    counts = target.deliveries()
    twice = {k: n for k, n in counts.items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    return counts


@pytest.mark.timeout(180 + 4 * KILLS)
def test_sigkill_at_random_moments_never_repeats_or_loses_an_effect(tmp_path: Path) -> None:
    """Kill the daemon at random moments during effects: no key delivered twice, no completed
    effect lost, every interrupted one unknown then reconciled or held."""
    seed = int(os.environ.get("EFFECTS_E2E_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    state_dir = tmp_path / "state"
    seen = Observed()
    started = time.monotonic()
    with running_target(response_delay=0.01) as target:
        config = tmp_path / "config.yaml"
        config.write_text(_config(state_dir, target.url))
        pending_intents = 0
        for kill in range(KILLS):
            d = Daemon(config)
            try:
                t0 = time.monotonic()
                d.ready(timeout=30)
                seen.ready_s.append(time.monotonic() - t0)
                # The intents the last kill interrupted are all unknown before ready.
                assert _recovered_unknown(d) == pending_intents, f"kill {kill}, seed {seed}"
                time.sleep(rng.uniform(0.0, MAX_KILL_DELAY_S))
                d.proc.send_signal(signal.SIGKILL)
                d.proc.wait(10)
            finally:
                d.stop()
            seen.collect(d.lines)
            delivered = _delivered(target)
            history = _read_ledger(state_dir)
            pending_intents = 0
            for (agent, key), records in history.items():
                if records[-1].status is EffectStatus.INTENT:
                    pending_intents += 1
                    seen.interrupted.add((agent, key))
                    seen.intent_lines.add(((agent, key), len(records) - 1))
                    seen.interrupted_delivered += delivered[idempotency_key(agent, "post", key)]
            seen.torn += any(
                p.read_bytes()[-1:] not in (b"", b"\n")
                for p in (state_dir / "effects").glob("*.jsonl")
            )

        # A last, clean round: every agent redoes its interrupted batch, then SIGTERM.
        d = Daemon(config)
        try:
            d.ready(timeout=30)
            assert _recovered_unknown(d) == pending_intents
            for agent in RECONCILING + HOLDING:
                d.event("run.finished", timeout=60, count=2, agent=agent, outcome="success")
            d.signal(signal.SIGTERM)
            assert d.wait(30) == 0
        finally:
            d.stop()
        seen.collect(d.lines)
        delivered = _delivered(target)

    history = _read_ledger(state_dir)
    final = {ident: records[-1] for ident, records in history.items()}
    where = f"(seed {seed})"
    assert not [i for i, r in final.items() if r.status is EffectStatus.INTENT], where

    def count(ident: tuple[str, str]) -> int:
        return delivered[idempotency_key(ident[0], "post", ident[1])]

    # No completed effect is lost.
    for ident in seen.executed | seen.reconciled:
        assert final[ident].status is EffectStatus.DONE, f"{ident}: {final[ident]} {where}"
    by_key = {idempotency_key(a, "post", k): (a, k) for a, k in final}
    for ikey in delivered:
        ident = by_key[ikey]  # the target never saw a key the ledger does not know
        assert final[ident].status in (EffectStatus.DONE, EffectStatus.UNKNOWN), where
    # What the ledger says matches what the target saw.
    for ident, record in final.items():
        if record.status is EffectStatus.DONE:
            assert count(ident) == 1, f"{ident} done but delivered {count(ident)}x {where}"
        else:
            assert record.status in (EffectStatus.UNKNOWN, EffectStatus.FAILED), where
            assert count(ident) <= 1
    # Every interrupted effect became unknown (the next open() wrote it), then was
    # reconciled or held.
    for ident, n in seen.intent_lines:
        after = history[ident][n + 1 :]
        assert after and after[0].status is EffectStatus.UNKNOWN, f"{ident} {where}"
    settled = Counter[str]()
    for ident in seen.interrupted:
        records = history[ident]
        statuses = [r.status.value for r in records]
        if ident[0] in RECONCILING:
            assert final[ident].status is EffectStatus.DONE, f"{ident}: {statuses} {where}"
            assert count(ident) == 1
            notes = [r.note or "" for r in records]
            assert any(n.startswith("reconcile:") for n in notes), f"{ident}: {notes} {where}"
            happened = [n for n in notes if n.startswith("reconcile:") and "did not" not in n]
            settled["reconciled: happened" if happened else "reconciled: not happened"] += 1
        else:
            assert final[ident].status is EffectStatus.UNKNOWN, f"{ident}: {statuses} {where}"
            assert ident in seen.held, f"{ident} never reported held {where}"
            assert statuses.count("intent") == 1 and "done" not in statuses, where
            settled["held"] += 1
    assert seen.executed, "no effect ever ran"
    took = time.monotonic() - started
    ready = sorted(seen.ready_s)
    print(
        f"\nseed {seed}: {KILLS} kills in {took:.0f}s (ready median {ready[len(ready) // 2]:.2f}s); "
        f"{len(final)} keys, {sum(delivered.values())} deliveries, none twice; "
        f"{len(seen.interrupted)} interrupted ({seen.interrupted_delivered} after the target "
        f"had them): {dict(settled)}; {seen.torn} kills left a torn last line"
    )
