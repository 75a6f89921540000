"""Side effects in the real daemon: exactly once, approvals through the CLI, rate limits across
restarts, least privilege, webhooks and the CLI's errors.

Every effect goes to ``EffectTarget``, a loopback server in the test process that records
every request it receives (it never dedupes), so "exactly once" is counted at the target.
The CLI runs as a subprocess (``python -m supervisor <cmd> --config <file>``) against the
daemon's control socket, as an operator would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from supervisor.effects import EffectRecord, EffectStatus, idempotency_key
from supervisor.effects.ledger.base import decode_record
from tests.e2e.conftest import Daemon, fleet_config
from tests.e2e.effect_target import EffectTarget, running_target

# Each test starts daemons and runs the CLI as subprocesses (up to ~20): on a loaded machine
# that alone can take a minute, so the per-test limit is above the suite's default.
pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(300)]

EFFECTS = "agent_supervisor_effects_total"
REFUSALS = "agent_supervisor_effect_refusals_total"
#: the run-level retry of the incident: the HTTP errors are declared transient
RETRY = {
    "attempts": 3,
    "base_delay": 0.05,
    "max_delay": 0.1,
    "transient": ["httpx2:TransportError", "httpx2:HTTPStatusError"],
}
NOBODY = 65534
DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def target() -> Iterator[EffectTarget]:
    with running_target() as t:
        yield t


def _config(tmp_path: Path, agents: list[dict[str, Any]], **settings: Any) -> str:
    """A daemon config with the effect agents importable and an absolute state dir."""
    settings.setdefault("state_dir", str(tmp_path / "state"))
    return fleet_config(yaml.safe_dump({"agents": agents}, sort_keys=False), **settings)


def _agent(name: str, run: str, url: str, **extra: Any) -> dict[str, Any]:
    params = {"url": url, **extra.pop("params", {})}
    return {
        "name": name,
        "run": f"effect_agents:{run}",
        "schedule": extra.pop("schedule", "every 1h"),
        "params": params,
        **extra,
    }


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_SUPERVISOR_")}
    env.pop("RUNTIME_DIRECTORY", None)
    return env


def cli(config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``agent-supervisor <args> --config <config>`` as a subprocess, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(config)],
        cwd=config.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(config: Path, *args: str) -> Any:
    """Run a CLI command with ``--json``; it must succeed; return the parsed answer."""
    done = cli(config, *args, "--json")
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def trigger(config: Path, agent: str) -> dict[str, Any]:
    """``trigger AGENT --wait --json``: the run record (exit 0 only for success)."""
    done = cli(config, "trigger", agent, "--wait", "--json")
    record: dict[str, Any] = orjson.loads(done.stdout)
    assert done.returncode == (0 if record["outcome"] == "success" else 1), done.stderr
    return record


def ledger(state_dir: Path, agent: str) -> dict[str, list[EffectRecord]]:
    """Every line of the agent's effect ledger, grouped by key, in write order."""
    path = state_dir / "effects" / f"{agent}.jsonl"
    history: dict[str, list[EffectRecord]] = {}
    for line in path.read_bytes().splitlines():
        record = decode_record(line)
        history.setdefault(record.key, []).append(record)
    return history


def stop(d: Daemon) -> None:
    """SIGTERM: a clean stop, exit status 0."""
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0


# -- the incident: 47 posts ---------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["reset", "500"])
@pytest.mark.parametrize("reconcile", [True, False], ids=["reconcile", "no-reconcile"])
def test_publisher_posts_exactly_once_through_retries_and_scheduled_runs(
    daemon_factory: DaemonFactory, tmp_path: Path, failure: str, reconcile: bool
) -> None:
    """The incident, end to end: the platform records the post and then fails (connection
    reset / 500); the run-level retry and a scheduled run every 0.3 s follow. The platform
    receives the post exactly once, with the effect's Idempotency-Key. With a reconcile
    every later call is a duplicate prevented and every run succeeds; without one the key is
    held (unknown) and every run fails loudly until a human resolves it via the CLI."""
    runs_wanted = 10
    with running_target(fail_first=failure) as target:
        publisher = _agent(
            "publisher",
            "publisher",
            target.url,
            schedule="every 0.3s",
            params={"reconcile": reconcile},
            guards={"retry": RETRY, "circuit": {"failures": 0}},
        )
        text = _config(tmp_path, [publisher])
        d = daemon_factory(text).ready()
        runs = d.event("run.finished", timeout=30, count=runs_wanted, agent="publisher")

        posts = target.received()
        assert len(posts) == 1, [p.json() for p in posts]
        assert posts[0].idempotency_key == idempotency_key("publisher", "post", "launch")
        assert posts[0].answer == ("reset" if failure == "reset" else "500")
        first = runs[0]
        assert first["attempts"] == 2  # attempt 1 sent the post and failed; attempt 2 asked
        assert len([x for x in d.lines if x.get("event") == "run.retry"]) == 1
        assert d.sample(EFFECTS, agent="publisher", kind="post", event="outcome_unknown") == 1
        assert d.sample(EFFECTS, agent="publisher", kind="post", event="executed") is None
        seen = len(d.runs("publisher"))
        if reconcile:
            assert {r["outcome"] for r in runs} == {"success"}
            assert d.sample(EFFECTS, agent="publisher", kind="post", event="reconciled_done") == 1
            # One when reconcile settled it, then one per later run.
            prevented = d.sample(
                EFFECTS, agent="publisher", kind="post", event="duplicate_prevented"
            )
            assert prevented is not None and prevented >= seen
            history = ledger(tmp_path / "state", "publisher")["launch"]
            assert [r.status for r in history] == [
                EffectStatus.INTENT,
                EffectStatus.UNKNOWN,
                EffectStatus.DONE,
            ]
            assert (history[-1].note or "").startswith("reconcile:") and history[-1].attempts == 1
        else:
            assert {r["outcome"] for r in runs} == {"failure"}
            assert all("held for a human" in r["error"] for r in runs)
            held = d.sample(EFFECTS, agent="publisher", kind="post", event="held_unknown")
            assert held is not None and held >= seen  # run 1's retry, then every later run
            # The error names the command that settles it; a human runs it.
            command = "agent-supervisor resolve publisher post 'launch' --happened|--not-happened"
            assert command in runs[-1]["error"]
            resolved = cli_json(
                tmp_path / "config.yaml", "resolve", "publisher", "post", "launch", "--happened"
            )
            assert resolved["status"] == "done" and "resolved by" in resolved["note"]
            after = len(d.runs("publisher"))
            later = d.event("run.finished", timeout=10, count=after + 3, agent="publisher")
            assert {r["outcome"] for r in later[after + 1 :]} == {"success"}
        assert len(target.received()) == 1


# -- approvals through the CLI ---------------------------------------------------------------


def _deploy_config(
    tmp_path: Path, target: EffectTarget, versions: dict[str, str], **approval: Any
) -> str:
    agents = [
        _agent(name, "deployer", target.url, params={"version": v}) for name, v in versions.items()
    ]
    return _config(
        tmp_path,
        agents,
        effects={"kinds": {"deploy": {"high_risk": True}}, "approval": approval},
    )


def test_approve_and_reject_through_the_cli_across_a_restart(
    daemon_factory: DaemonFactory, tmp_path: Path, target: EffectTarget
) -> None:
    """High-risk deploys end the run awaiting_approval and POST the request to the webhook
    (generic JSON); after a SIGTERM and a restart ``approvals`` still lists both; ``approve``
    makes the agent's next run execute its deploy exactly once (later runs do not repeat it);
    ``reject --reason`` means it never runs."""
    text = _deploy_config(
        tmp_path,
        target,
        {"deploy_a": "1.2.0", "deploy_b": "1.3.0"},
        webhook_url=f"{target.url}/hook",
    )
    config = tmp_path / "config.yaml"
    first = daemon_factory(text).ready()
    asked: dict[str, str] = {}
    for agent in ("deploy_a", "deploy_b"):
        run = trigger(config, agent)
        assert run["outcome"] == "awaiting_approval"
        assert "waits for approval" in run["error"]
    hooks = [r.json() for r in target.wait_for("/hook", 2)]
    for hook in hooks:
        asked[hook["agent"]] = hook["id"]
        assert hook["kind"] == "deploy" and hook["status"] == "pending_approval"
        assert hook["approve"] == f"agent-supervisor approve {hook['id']}"
        assert hook["reason"].startswith("release ") and hook["params"]["env"] == "prod"
    assert {h["key"] for h in hooks} == {"deploy-1.2.0", "deploy-1.3.0"}
    # Asking again while it waits: the same request, no second notification.
    again = trigger(config, "deploy_a")
    assert again["outcome"] == "awaiting_approval" and asked["deploy_a"] in again["error"]
    assert len(target.received("/hook")) == 2
    assert first.sample(EFFECTS, agent="deploy_a", kind="deploy", event="approval_requested") == 1
    assert first.sample(EFFECTS, agent="deploy_a", kind="deploy", event="approval_waiting") == 1
    # The gauge is refreshed by the approvals loop (at start, then every 30 s) and after a
    # decision, not when a request is made: still 0 here.
    assert first.sample("agent_supervisor_effect_approvals_pending") == 0
    stop(first)

    # The daemon is down: the requests wait in the ledger.
    down = cli(config, "approvals")
    assert down.returncode == 1 and "the daemon is not running" in down.stderr

    second = daemon_factory(text).ready()
    pending = cli_json(config, "approvals")
    assert {p["agent"]: p["id"] for p in pending} == asked
    assert {p["params"]["version"] for p in pending} == {"1.2.0", "1.3.0"}
    assert all(p["status"] == "pending_approval" for p in pending)
    listing = cli(config, "approvals")
    assert listing.returncode == 0 and asked["deploy_a"] in listing.stdout
    assert second.sample("agent_supervisor_effect_approvals_pending") == 2

    approved = cli_json(config, "approve", asked["deploy_a"])
    assert approved["status"] == "approved" and approved["decided_by"]
    rejected = cli_json(config, "reject", asked["deploy_b"], "--reason", "not on a friday")
    assert rejected["status"] == "rejected" and rejected["note"] == "not on a friday"
    assert cli(config, "approvals").stdout.strip() == "no approval requests pending"
    assert target.received() == []  # approval alone runs nothing

    run = trigger(config, "deploy_a")
    assert run["outcome"] == "success" and run["result"]["version"] == "1.2.0"
    for _ in range(2):
        assert trigger(config, "deploy_a")["outcome"] == "success"
    deploys = target.received()
    assert len(deploys) == 1 and deploys[0].json()["key"] == "deploy-1.2.0"
    assert deploys[0].idempotency_key == idempotency_key("deploy_a", "deploy", "deploy-1.2.0")

    refused = trigger(config, "deploy_b")
    assert refused["outcome"] == "failure"
    assert "rejected by" in refused["error"] and "not on a friday" in refused["error"]
    assert len(target.received()) == 1

    closed = cli(config, "approve", asked["deploy_b"])
    assert closed.returncode == 1 and "is rejected, not pending" in closed.stderr
    assert second.sample(EFFECTS, agent="deploy_a", kind="deploy", event="approved") == 1
    assert second.sample(EFFECTS, agent="deploy_a", kind="deploy", event="executed") == 1
    assert second.sample(EFFECTS, agent="deploy_a", kind="deploy", event="duplicate_prevented") == 2
    assert second.sample(EFFECTS, agent="deploy_b", kind="deploy", event="rejected") == 1
    assert second.sample(REFUSALS, agent="deploy_b", kind="deploy", reason="rejected") == 1
    assert second.sample("agent_supervisor_effect_approvals_pending") == 0


def test_approvals_expire_and_never_run_late(
    daemon_factory: DaemonFactory, tmp_path: Path, target: EffectTarget
) -> None:
    """With ``approval.expiry: 4s`` (and a Slack-format webhook): a request not decided in
    time cannot be approved, one the agent asks for again is rejected as expired, and an
    approval not used in time expires too; none of them ever reaches the target."""
    text = _deploy_config(
        tmp_path,
        target,
        {"late_use": "2.2.0", "late_cli": "2.0.0", "late_run": "2.1.0"},
        expiry="4s",
        webhook_url=f"{target.url}/hook",
        webhook_format="slack",
    )
    config = tmp_path / "config.yaml"
    d = daemon_factory(text).ready()
    ids: dict[str, str] = {}
    deadlines: list[datetime] = []
    for agent in ("late_use", "late_cli", "late_run"):
        run = trigger(config, agent)
        assert run["outcome"] == "awaiting_approval"
        ids[agent] = _approval_id(run["error"])
        if agent == "late_use":  # approved at once, then not used in time
            approved = cli_json(config, "approve", ids[agent])
            assert approved["status"] == "approved"
            deadlines.append(datetime.fromisoformat(approved["expires_at"]))
    pending = cli_json(config, "approvals")
    assert {p["agent"]: p["id"] for p in pending} == {a: ids[a] for a in ("late_cli", "late_run")}
    deadlines += [datetime.fromisoformat(p["expires_at"]) for p in pending]
    hooks = [r.json() for r in target.wait_for("/hook", 3)]
    assert all(set(h) == {"text"} for h in hooks)
    texts = "\n".join(h["text"] for h in hooks)
    for agent, approval_id in ids.items():
        assert f"*{agent}*" in texts and f"agent-supervisor approve {approval_id}" in texts

    # Real time: the daemon's clock is the system clock.
    time.sleep(max(0.0, (max(deadlines) - datetime.now(UTC)).total_seconds()) + 0.2)

    late = cli(config, "approve", ids["late_cli"])
    assert late.returncode == 1 and "expired at" in late.stderr and "will not run" in late.stderr
    for agent in ("late_run", "late_use"):
        run = trigger(config, agent)
        assert run["outcome"] == "failure"
        assert "expired; it will not run" in run["error"], run["error"]
        assert d.sample(REFUSALS, agent=agent, kind="deploy", reason="approval_expired") == 1
    assert cli(config, "approvals").stdout.strip() == "no approval requests pending"
    assert target.received() == []
    for agent in ids:
        assert d.sample(EFFECTS, agent=agent, kind="deploy", event="expired") == 1
        (record,) = ledger(tmp_path / "state", agent).values()
        assert record[-1].status is EffectStatus.EXPIRED


def _approval_id(error: str) -> str:
    """The approval id named by an ``ApprovalPending`` message."""
    found = re.search(r"waits for approval ([0-9a-f]{12})", error)
    assert found is not None, error
    return found.group(1)


# -- the gatekeeper: rate limits, least privilege ------------------------------------------------


def test_rate_limit_two_per_day_holds_across_restarts(
    daemon_factory: DaemonFactory, tmp_path: Path, target: EffectTarget
) -> None:
    """``post: {rate: 2/day}``: one post, a restart, a second post, then every further run is
    refused (rate_limited, with limit and observed), also after another restart."""
    agent = _agent(
        "limited", "counter_poster", target.url, effects={"kinds": {"post": {"rate": "2/day"}}}
    )
    text = _config(tmp_path, [agent])
    config = tmp_path / "config.yaml"

    first = daemon_factory(text).ready()
    assert trigger(config, "limited")["outcome"] == "success"
    stop(first)
    second = daemon_factory(text).ready()
    assert trigger(config, "limited")["outcome"] == "success"
    for _ in range(2):
        refused = trigger(config, "limited")
        assert refused["outcome"] == "failure"
        assert "rate limit 2/day reached (limit 2, observed 2)" in refused["error"]
    stop(second)
    third = daemon_factory(text).ready()
    for _ in range(2):
        assert trigger(config, "limited")["outcome"] == "failure"
    assert third.sample(REFUSALS, agent="limited", kind="post", reason="rate_limited") == 2
    assert [r.json()["key"] for r in target.received()] == ["post-1", "post-2"]


def test_effect_kind_outside_the_allow_list_is_refused_and_counted(
    daemon_factory: DaemonFactory, tmp_path: Path, target: EffectTarget
) -> None:
    """``effects: {allow: [post]}``: the post goes out; the deploy is refused before any
    request, with an error naming the agent and the rule, and counted as not_allowed."""
    agent = _agent("overreacher", "overreacher", target.url, effects={"allow": ["post"]})
    text = _config(tmp_path, [agent])
    d = daemon_factory(text).ready()
    run = trigger(tmp_path / "config.yaml", "overreacher")
    assert run["outcome"] == "failure"
    assert "agent 'overreacher'" in run["error"]
    assert "rule agents.overreacher.effects.allow (allowed: post)" in run["error"]
    assert [r.json()["key"] for r in target.received()] == ["hello"]
    assert d.sample(REFUSALS, agent="overreacher", kind="deploy", reason="not_allowed") == 1
    assert d.sample(EFFECTS, agent="overreacher", kind="post", event="executed") == 1
    # Nothing was recorded for the refused kind.
    assert set(ledger(tmp_path / "state", "overreacher")) == {"hello"}


def test_http_outside_the_allow_list_fails_before_any_connection(
    daemon_factory: DaemonFactory, tmp_path: Path, target: EffectTarget
) -> None:
    """``http.allow_hosts`` without the target's host: ``ctx.http`` refuses before connecting
    (the target accepts no connection at all), names the agent and the rule, and counts it.
    With the host allowed, a post made through ``ctx.http`` inside ``ctx.effect`` carries the
    effect's Idempotency-Key without the agent setting it, and happens once over three runs."""
    fenced = _agent(
        "fenced", "http_publisher", target.url, http={"allow_hosts": ["api.example.com"]}
    )
    allowed = _agent("allowed", "http_publisher", target.url, http={"allow_hosts": ["127.0.0.1"]})
    text = _config(tmp_path, [fenced, allowed])
    config = tmp_path / "config.yaml"
    d = daemon_factory(text).ready()

    run = trigger(config, "fenced")
    assert run["outcome"] == "failure"
    assert "agent 'fenced'" in run["error"]
    assert "host '127.0.0.1' is not in http.allow_hosts (api.example.com)" in run["error"]
    assert target.connections == 0 and target.requests == []
    assert d.sample("agent_supervisor_http_refused_total", agent="fenced") == 1
    assert not (tmp_path / "state" / "effects" / "fenced.jsonl").exists()

    runs = [trigger(config, "allowed") for _ in range(3)]
    assert [r["outcome"] for r in runs] == ["success"] * 3
    assert [r["result"]["known_before"] for r in runs] == [False, True, True]
    (post,) = target.received()
    assert post.idempotency_key == idempotency_key("allowed", "post", "via-http")
    assert d.sample(EFFECTS, agent="allowed", kind="post", event="duplicate_prevented") == 2


# -- the CLI's errors ----------------------------------------------------------------------------


def test_cli_errors_unknown_ids_and_daemon_down(
    daemon_factory: DaemonFactory, tmp_path: Path, target: EffectTarget
) -> None:
    """Unknown approval ids and effects give exit 1 and a clear message; with the daemon
    down every control command says so and exits 1."""
    text = _config(tmp_path, [_agent("publisher", "publisher", target.url)])
    config = tmp_path / "config.yaml"
    config.write_text(text)  # the CLI reads it before any daemon started
    for args in (("approvals",), ("approve", "abc123"), ("reject", "abc123"), ("status",)):
        down = cli(config, *args)
        assert down.returncode == 1, args
        assert "the daemon is not running" in down.stderr, down.stderr

    daemon_factory(text).ready()
    for verb in ("approve", "reject"):
        unknown = cli(config, verb, "abc123")
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == (
            f"agent-supervisor {verb}: approval abc123: no such approval request"
        )
    missing = cli(config, "resolve", "publisher", "post", "nope", "--happened")
    assert missing.returncode == 1 and "has no effect post:'nope'" in missing.stderr


_AS_NOBODY = f"""
import os, sys
import supervisor.cli, supervisor.cli_control  # imported as root: the interpreter lives under /root
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sys.exit(supervisor.cli.main(sys.argv[1:]))
"""


def cli_as_nobody(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A CLI command run by uid 65534 (nobody), against the socket at ``socket_path``."""
    return subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, *args, "--socket", str(socket_path)],
        cwd=socket_path.parent,
        env={**_env(), "USER": "nobody", "LOGNAME": "nobody"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="effects-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another uid")
@pytest.mark.parametrize("mode", [0o660, 0o666], ids=["0660", "0666"])
def test_cli_as_another_user(
    daemon_factory: DaemonFactory, tmp_path: Path, open_dir: Path, mode: int
) -> None:
    """Socket 0660 owned by root: nobody's CLI gets a clear permission message, exit 1.
    Socket 0666: nobody may read (``approvals``) but the daemon refuses ``approve``
    (peer credentials), exit 1."""
    sock = open_dir / "control.sock"
    text = _config(tmp_path, [], control={"socket": str(sock), "mode": mode})
    daemon_factory(text).ready()
    assert sock.stat().st_uid == 0 and sock.stat().st_mode & 0o777 == mode
    listing = cli_as_nobody(sock, "approvals")
    approve = cli_as_nobody(sock, "approve", "abc123")
    if mode == 0o660:
        for done in (listing, approve):
            assert done.returncode == 1, done
            assert f"permission denied on {sock}" in done.stderr, done.stderr
            assert "join the socket's group" in done.stderr
    else:
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.strip() == "no approval requests pending"
        assert approve.returncode == 1
        assert "uid 65534 may not approve" in approve.stderr, approve.stderr
