"""CLI commands that talk to the running daemon over its control socket."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from supervisor.config import control_socket_path, load_config
from supervisor.control import ControlClient, ControlError
from supervisor.errors import ConfigError


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        config = load_config(args.config, import_agents=False)
    except ConfigError as exc:
        # Right after a bad edit is exactly when the operator needs the CLI: try the place
        # systemd's RuntimeDirectory puts the socket before giving up.
        runtime = os.environ.get("RUNTIME_DIRECTORY") or "/run/agent-supervisor"
        fallback = Path(runtime.split(":")[0]) / "control.sock"
        if fallback.exists():
            return fallback
        raise ControlError("config", f"cannot find the control socket: {exc}") from None
    return control_socket_path(config.settings, os.environ)


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cmd = args.command
    who = getpass.getuser()
    if cmd in ("runs", "pause", "resume", "state"):
        return cmd, {"agent": args.agent}
    if cmd == "trace":
        return cmd, {"run_id": args.run_id}
    if cmd == "trigger":
        return cmd, {"agent": args.agent, "wait": args.wait}
    if cmd == "approve":
        return cmd, {"id": args.id, "by": who}
    if cmd == "reject":
        return cmd, {"id": args.id, "by": who, "reason": args.reason}
    if cmd == "resolve":
        return cmd, {
            "agent": args.agent,
            "kind": args.kind,
            "key": args.key,
            "happened": args.happened,
            "by": who,
        }
    return cmd, {}


def run_control(args: argparse.Namespace) -> int:
    """Send the command to the daemon and print the answer; 0 on success, 1 on any error."""
    try:
        op, params = _request(args)
        client = ControlClient(_socket(args), timeout=3600 if op == "trigger" else 30)

        def progress(event: dict[str, Any]) -> None:
            if not args.json:
                print(
                    f"  {event.get('run_id', '')}: {event.get('steps', 0)} steps", file=sys.stderr
                )

        result = client.call(op, params, on_event=progress)
    except ControlError as exc:
        print(f"agent-supervisor {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json or op == "reload":  # reload: one line, it lands in the journal via ExecReload
        print(orjson.dumps(result, option=0 if op == "reload" else orjson.OPT_INDENT_2).decode())
    else:
        _print(op, result)
    if op == "trigger" and isinstance(result, dict) and "outcome" in result:
        return 0 if result["outcome"] == "success" else 1
    return 0


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [
        max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)
    ]
    print("  ".join(t.ljust(w) for (_, t), w in zip(columns, widths, strict=True)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _age(seconds: Any) -> str:
    if seconds is None:
        return "never"
    s = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit} ago"
    return f"{s:.0f}s ago"


def _print_cluster(cluster: dict[str, Any]) -> None:
    """The node lines of ``status`` in cluster mode: who is alive, whose config differs."""
    nodes = cluster["nodes"]
    names = [n["node"] + (" (this node)" if n["node"] == cluster["node"] else "") for n in nodes]
    print(f"node {cluster['node']}; {len(nodes)} live nodes: {', '.join(names) or '-'}")
    for n in nodes:
        if not n["config_matches"]:
            print(
                f"CONFIG MISMATCH: node {n['node']} runs config {n['config_hash']} "
                f"(this node: {cluster['config_hash']}); nodes do not merge configs: deploy "
                "the same file to every node"
            )
    if cluster.get("error"):
        print(f"cluster status incomplete: {cluster['error']}")


def _print_status(result: Any) -> None:
    rows = []
    for r in result["agents"]:
        spend = r.get("spend_today_usd")
        budget = r.get("budget_today_usd")
        rows.append(
            {
                **r,
                "state": "blocked"
                if r["blocked"]
                else "paused"
                if r["paused"]
                else "running"
                if r["running"]
                else "disabled"
                if not r["enabled"]
                else "idle",
                "last": f"{r['last_outcome'] or '-'} {r['last_run_at'] or ''}".strip(),
                "success": _age(r["last_success_age_s"]),
                "spend": "-"
                if spend is None
                else f"${spend:.4f}" + (f" / ${budget:g}" if budget is not None else ""),
            }
        )
    columns = [
        ("agent", "AGENT"),
        ("state", "STATE"),
        ("schedule", "SCHEDULE"),
        ("next_fire", "NEXT"),
        ("last", "LAST RUN"),
        ("success", "LAST SUCCESS"),
        ("circuit", "CIRCUIT"),
        ("spend", "SPEND TODAY"),
    ]
    cluster = result.get("cluster")
    if cluster is not None:
        for row in rows:
            claim = row.get("claim")
            row["node"] = f"{claim['node']} ({claim['status']})" if claim else "-"
        columns.insert(4, ("node", "NODE"))
    _table(rows, columns)
    print(f"{result['in_flight']} runs in flight; agent-supervisor {result['version']}")
    if cluster is not None:
        _print_cluster(cluster)


def _print(op: str, result: Any) -> None:
    if op == "status":
        _print_status(result)
    elif op == "runs":
        _table(
            result,
            [
                ("run_id", "RUN"),
                ("outcome", "OUTCOME"),
                ("started_at", "STARTED"),
                ("duration_s", "SECONDS"),
                ("steps", "STEPS"),
                ("attempts", "ATTEMPTS"),
                ("error", "ERROR"),
            ],
        )
    elif op == "trace":
        print(
            f"{result['agent']} run {result['run_id']}: {result['outcome']} in "
            f"{result['duration_s']}s, {result['steps']} steps"
        )
        for e in result.get("events", []):
            rest = {k: v for k, v in e.items() if k not in ("kind", "t")}
            print(
                f"  {e.get('t', 0):>12.3f}  {e.get('kind', ''):<14} "
                + " ".join(f"{k}={_cell(v)}" for k, v in rest.items())
            )
        if result.get("events_dropped"):
            print(f"  ({result['events_dropped']} earlier events dropped)")
    elif op == "approvals":
        if not result:
            print("no approval requests pending")
            return
        _table(
            result,
            [
                ("id", "ID"),
                ("agent", "AGENT"),
                ("kind", "KIND"),
                ("key", "KEY"),
                ("reason", "WHY"),
                ("expires_at", "EXPIRES"),
            ],
        )
    elif op == "trigger" and "outcome" in result:
        print(
            f"{result['agent']} run {result['run_id']}: {result['outcome']} in "
            f"{result['duration_s']:.3f}s, {result['steps']} steps"
        )
        if result.get("error"):
            print(f"  error: {result['error']}")
    else:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
