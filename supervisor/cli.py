"""The ``agent-supervisor`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson

from supervisor import __version__
from supervisor.config import LoadedConfig, default_config_path, load_config
from supervisor.durations import format_duration
from supervisor.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agent-supervisor",
        description="Run a fleet of AI agents on schedules, under guards.",
    )
    p.add_argument("--version", action="version", version=f"agent-supervisor {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "-c",
            "--config",
            default=default_config_path(),
            help="config file (default: $AGENT_SUPERVISOR_CONFIG or %(default)s)",
        )
        return sp

    with_config(sub.add_parser("run", help="run the daemon in the foreground"))
    check = with_config(sub.add_parser("check", help="validate the config (like nginx -t)"))
    check.add_argument("--json", action="store_true", help="machine-readable output")
    once = with_config(
        sub.add_parser("run-once", help="run one agent now in the foreground, under its guards")
    )
    once.add_argument("agent")
    once.add_argument("--json", action="store_true", help="print the run record as JSON")

    def control(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = with_config(sub.add_parser(name, help=help_text))
        sp.add_argument("--socket", help="control socket (default: from the config)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    control("status", "every agent: schedule, next run, last outcome, circuit, spend")
    control("runs", "recent runs of an agent").add_argument("agent")
    control("trace", "a run's steps, calls and effects, in order").add_argument("run_id")
    trig = control("trigger", "run an agent now")
    trig.add_argument("agent")
    trig.add_argument("--wait", action="store_true", help="follow the run until it ends")
    control("pause", "stop scheduling an agent (kept across restarts)").add_argument("agent")
    control("resume", "schedule a paused agent again").add_argument("agent")
    control("reload", "re-read the config; prints why if it is rejected")
    control("state", "print an agent's state file").add_argument("agent")
    control("approvals", "pending approval requests")
    control("approve", "approve a high-risk effect").add_argument("id")
    rej = control("reject", "reject a high-risk effect")
    rej.add_argument("id")
    rej.add_argument("--reason", default=None)
    res = control("resolve", "settle an effect whose outcome is unknown")
    res.add_argument("agent")
    res.add_argument("kind")
    res.add_argument("key")
    happened = res.add_mutually_exclusive_group(required=True)
    happened.add_argument("--happened", action="store_true", dest="happened")
    happened.add_argument("--not-happened", action="store_false", dest="happened")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config)
    if args.command == "check":
        return _check(args.config, args.json)
    if args.command == "run-once":
        return anyio.run(_run_once, args.config, args.agent, args.json, backend="asyncio")
    from supervisor.cli_control import run_control

    return run_control(args)


def _run(config: str) -> int:
    from supervisor.daemon import Daemon

    daemon = Daemon(config, environ=os.environ)
    return anyio.run(daemon.run, backend="asyncio")


def _check(path: str, as_json: bool) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        if as_json:
            problems = [
                {"file": p.file, "line": p.line, "path": p.path, "message": p.message}
                for p in exc.problems
            ]
            print(orjson.dumps({"ok": False, "problems": problems}).decode())
        else:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            n = len(exc.problems)
            print(f"{path}: {n} problem{'s' * (n != 1)}; config test failed", file=sys.stderr)
        return 1
    llm = _llm_summary(config)
    if as_json:
        print(orjson.dumps({"ok": True, "agents": _agent_rows(config), "llm": llm}).decode())
        return 0
    rows = _agent_rows(config)
    enabled = sum(1 for r in rows if r["enabled"])
    print(f"{path}: config is valid: {len(rows)} agents ({enabled} enabled)")
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        flag = "" if r["enabled"] else "  (disabled)"
        print(f"  {r['name']:<{width}}  {r['schedule']:<24} next {r['next_fire']}{flag}")
    if llm is not None:
        print(f"price table: as of {llm['prices_as_of']} ({llm['prices_source']})")
        for alias, chain in llm["aliases"].items():
            print(f"  alias {alias}: {' -> '.join(chain)}")
        for warning in llm["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _llm_summary(config: LoadedConfig) -> dict[str, Any] | None:
    """Aliases, the price table's date and source, and models that would be refused."""
    llm = config.settings.llm
    if not llm.providers:
        return None
    from supervisor.llm.prices import PriceTable

    table = PriceTable.bundled().with_overrides(llm.models)
    warnings = [
        f"secret {p.api_key.secret!r} is not set: calls to {p.base_url} will fail authentication"
        for p in llm.providers.values()
        if p.api_key is not None and p.api_key.secret.lower() not in config.secrets
    ]
    for alias, chain in llm.aliases.items():
        for ref in chain:
            provider, _, model = ref.partition("/")
            if table.price(provider, model) is None and not llm.allow_unpriced:
                warnings.append(
                    f"alias {alias!r}: {ref} has no price and will be refused "
                    "(set llm.models.<ref>.price or llm.allow_unpriced)"
                )
    return {
        "prices_as_of": table.as_of.isoformat() if table.as_of else None,
        "prices_source": table.source,
        "aliases": llm.aliases,
        "warnings": warnings,
    }


def _agent_rows(config: LoadedConfig) -> list[dict[str, Any]]:
    from supervisor.scheduler import make_trigger

    rows = []
    now = datetime.now(UTC)
    for spec in config.agents.values():
        sched = spec.config.schedule
        text = f"cron {sched.cron}" if sched.cron else f"every {format_duration(sched.every or 0)}"
        trigger = make_trigger(sched, config.settings.timezone)
        nxt = trigger.get_next_fire_time(None, now)
        rows.append(
            {
                "name": spec.name,
                "run": spec.config.run,
                "schedule": text,
                "enabled": spec.config.enabled,
                "next_fire": nxt.astimezone(UTC).isoformat(timespec="seconds") if nxt else None,
            }
        )
    return rows


async def _run_once(path: str, agent: str, as_json: bool) -> int:
    from supervisor.daemon import Daemon, StartupError
    from supervisor.logging import configure_logging

    daemon = Daemon(path, environ=os.environ)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if agent not in config.agents:
        known = ", ".join(sorted(config.agents)) or "none"
        print(f"unknown agent {agent!r} (configured: {known})", file=sys.stderr)
        return 1
    settings = config.settings
    configure_logging(settings.log_level, stream=sys.stderr.buffer, secrets=config.secret_values)
    daemon.config = config
    try:
        record, slot = await daemon.run_once(agent)
    except StartupError as exc:
        detail = exc.fields.get("error", exc.event)
        print(f"{detail}; use the running daemon to trigger runs", file=sys.stderr)
        return 1
    if record is None:
        reason = slot.blocked if slot is not None else "unknown"
        print(f"agent {agent!r} cannot run: {reason}", file=sys.stderr)
        return 1
    doc = Daemon.record_doc(record)
    if as_json:
        print(orjson.dumps(doc).decode())
    else:
        print(
            f"{record.agent} run {record.run_id}: {record.outcome.value} in "
            f"{record.duration_s:.3f}s, {record.steps} steps, {record.attempts} attempts"
        )
        if record.error:
            print(f"  error: {record.error}")
        if record.result is not None:
            print(f"  result: {orjson.dumps(record.result).decode()}")
        if record.partial is not None:
            print(f"  partial: {orjson.dumps(record.partial).decode()}")
    return 0 if record.outcome.value == "success" else 1
