"""The bundled fleet, ``config/example.yaml``, in the real daemon: offline, no API key.

The test runs the real file with its interval schedules compressed
(``AGENT_SUPERVISOR_SCHEDULE_SCALE``) and two text substitutions: the metrics port and the
port of the local model server become free ports of this machine (the monitor watches both).
The daemon's working directory is a temp folder holding a copy of ``agents/data``, so every
path of the file resolves there, and everything the fleet writes lands under its ``var/``.

Within a bounded time it shows: the analyst's report (rule-based: no model answers), the
sample posts published exactly once and never more than the limit of two a day, a
state-change alert from the monitor (and one recovery when the model server comes up), and
a digest listing the runs.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, Daemon

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: every interval schedule runs 5x faster: monitor 2s, analyst and publisher 3s, digest 4s
SCALE = "0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], d: Daemon, timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert d.proc.poll() is None, f"the daemon exited: {d.stderr[-2000:]!r}"
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout}s for {what}; last log lines: {d.lines[-5:]!r}")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class ModelServerComesUp:
    """A listener on the model server's port that accepts and hangs up at once: the
    monitor's TCP check sees it up, and a model call fails fast instead of hanging."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_the_example_fleet_runs_offline(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """A report, posts published once within the limit, a monitor alert on a change of
    state, and a digest of the runs, from config/example.yaml as shipped."""
    metrics_port, model_port = free_port(), free_port()
    shutil.copytree(REPO / "agents" / "data", tmp_path / "agents" / "data")
    text = (REPO / "config" / "example.yaml").read_text()
    assert "127.0.0.1:9464" in text and "11434" in text
    text = text.replace("127.0.0.1:9464", f"127.0.0.1:{metrics_port}")
    text = text.replace("11434", str(model_port))
    d = daemon_factory(text, {"AGENT_SUPERVISOR_SCHEDULE_SCALE": SCALE}).ready(30)
    var = tmp_path / "var"
    assert d.port == metrics_port

    # The monitor: the model server is down, one alert says so, once.
    alerts = var / "alerts" / "monitor.jsonl"
    (down,) = wait_until("the monitor's down alert", lambda: lines(alerts), d)
    assert down["check"] == "local-llm" and down["transition"] == "down"
    assert down["key"].startswith("local-llm:down:") and down["idempotency_key"]
    assert "nothing listens" in down["cause"]  # the triage model is down too: the rules

    # The analyst: a report from the sample dataset; no model answered, the rules did.
    report = wait_until("the analyst's report", lambda: sorted((var / "reports").glob("*.md")), d)[
        0
    ]
    body = report.read_text()
    assert body.startswith("# sales: ") and "Analysis by a rule-based summary." in body
    assert "| orders | 32 |" in body
    d.event("llm.degraded", agent="analyst", alias="smart", tier="rule_based")
    assert (
        d.sample(
            "agent_supervisor_llm_answers_total", agent="analyst", alias="smart", tier="rule_based"
        )
        or 0
    ) >= 1

    # The publisher: the two first good posts, never more, whatever the number of runs.
    site = var / "publisher" / "site"
    wait_until("three publisher runs", lambda: len(d.runs("publisher")) >= 3, d)
    assert sorted(p.name for p in site.iterdir()) == ["hello-world.md", "release-0-1.md"]
    keys = {p.read_text().split("idempotency_key: ")[1].split("\n")[0] for p in site.iterdir()}
    assert len(keys) == 2
    executed = {"agent": "publisher", "kind": "post", "event": "executed"}
    assert d.sample("agent_supervisor_effects_total", **executed) == 2
    limited = {"agent": "publisher", "kind": "post", "reason": "rate_limited"}
    assert (d.sample("agent_supervisor_effect_refusals_total", **limited) or 0) >= 2
    queue = var / "publisher" / "queue"
    assert sorted(p.name for p in queue.glob("*.md")) == [
        "04-missing-title.md",  # invalid front matter: skipped, kept
        "05-pricing.md",  # risk: high, waits for approval
        "07-roadmap.md",  # over the limit: tomorrow
    ]
    assert sorted(p.name for p in (queue / "rejected").iterdir()) == [
        "02-hello-again.md",  # near-duplicate
        "03-growth-hack.md",  # banned phrase
    ]
    runs = d.runs("publisher")
    assert {r["outcome"] for r in runs} == {"awaiting_approval"}  # the pricing post waits
    last = runs[-1]["partial"]
    assert last["skipped"] == 1 and last["waiting_approval"] == ["pricing-2027"]
    assert "04-missing-title.md: front matter: title: Field required" in last["errors"][0]

    # The digest: the runs of the fleet, by agent and outcome.
    def digest_with_runs() -> str | None:
        for path in sorted((var / "digests").glob("*.md")):
            found = path.read_text()
            if all(f"| {a} |" in found for a in ("monitor", "analyst", "publisher")):
                return found
        return None

    digest = wait_until("a digest listing the runs", digest_with_runs, d, timeout=90)
    assert "## Runs by outcome" in digest and "## Approvals pending (1)" in digest
    assert "publisher post 'pricing-2027'" in digest

    # The model server comes up: one recovery alert; the down alert was never repeated.
    server = ModelServerComesUp(model_port)
    try:
        wait_until("the recovery alert", lambda: len(lines(alerts)) >= 2, d)
        n = len(d.runs("monitor"))
        wait_until("two more monitor runs", lambda: len(d.runs("monitor")) >= n + 2, d)
    finally:
        server.close()
    assert [a["transition"] for a in lines(alerts)] == ["down", "recovered"]

    d.signal(signal.SIGINT)
    assert d.wait(40) == 0
    assert sorted(p.name for p in site.iterdir()) == ["hello-world.md", "release-0-1.md"]
