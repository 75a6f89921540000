"""SIGKILL the real daemon at random moments while agents commit state: never a torn file.

``CRASH_KILLS`` sets the number of kills (default 50).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from supervisor.state.base import AgentState
from tests.e2e.conftest import Daemon, fleet_config

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

WRITERS = 4
SIZE = 20_000


def _check_state_file(path) -> int:
    """The file parses, validates and is one complete record; returns its generation."""
    doc = json.loads(path.read_bytes())
    state = AgentState.model_validate(doc)
    gen = state.data["gen"]
    assert state.data["payload"] == str(gen % 10) * SIZE, f"{path}: torn payload at gen {gen}"
    assert state.data["check"] == gen * 7, f"{path}: mixed generations"
    assert state.last_run is not None and state.totals.get("success", 0) >= 1
    return int(gen)


def test_sigkill_while_committing_never_leaves_a_torn_state_file(tmp_path) -> None:
    """Every state file parses after each kill and holds the old or the new record, whole."""
    kills = int(os.environ.get("CRASH_KILLS", "50"))
    rng = random.Random(int(os.environ.get("CRASH_SEED", str(time.time_ns()))))
    agents = "\n".join(
        f'  - {{name: w{i}, run: "fleet_agents:writer", schedule: every 0.02s, '
        f"params: {{size: {SIZE}}}}}"
        for i in range(WRITERS)
    )
    config = tmp_path / "config.yaml"
    config.write_text(fleet_config("agents:\n" + agents + "\n", max_concurrent_runs=WRITERS))
    state_dir = tmp_path / "state"
    last_gen = dict.fromkeys(range(WRITERS), 0)
    mid_write = 0
    for _ in range(kills):
        d = Daemon(config)
        try:
            d.ready(timeout=20)
            time.sleep(rng.uniform(0.0, 0.3))
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
        finally:
            d.stop()
        mid_write += any(p.name.endswith(".tmp") for p in state_dir.iterdir())
        for i in range(WRITERS):
            path = state_dir / f"w{i}.json"
            if path.exists():
                gen = _check_state_file(path)
                # A committed generation is never lost: the next one builds on it.
                assert gen >= last_gen[i]
                last_gen[i] = gen
    assert sum(last_gen.values()) > 0, "no run ever committed"
    print(f"{kills} kills, {mid_write} left a temp file (killed mid-write), gens={last_gen}")
