"""digest: a daily digest of the fleet itself, as Markdown, to a file and/or a webhook.

It reads, never writes, what the daemon keeps:

- its metrics endpoint (``GET /metrics`` on localhost): LLM spend by agent and model, budget
  left in each window (and runs by outcome, when no state directory is given);
- its state directory: every agent's run totals and recent errors (``<agent>.json``) and the
  approvals waiting in the effect ledger (``effects/<agent>.jsonl``).

Counters are cumulative, so the digest keeps the values it last reported in ``ctx.state`` and
shows what changed since (a counter that went down means the daemon restarted: its value is
all new). One digest per period (``period``, a strftime pattern), exactly once: effect kind
``digest`` for the file, ``webhook`` for the webhook.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field, model_validator

from agents.webhook import post_webhook
from supervisor import RunContext, TransientError

P = "agent_supervisor_"


class DigestParams(BaseModel):
    """Params of the digest agent: at least one source and one output."""

    #: the daemon's metrics endpoint, e.g. http://127.0.0.1:9464/metrics
    metrics_url: str | None = None
    #: the daemon's state directory (``state_dir`` in its config), read only
    state_dir: Path | None = None
    out_dir: Path | None = None
    webhook_url: str | None = None
    #: one digest per period: "%Y-%m-%d" is daily
    period: str = "%Y-%m-%d"
    max_failures: int = Field(default=20, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DigestParams:
        if self.metrics_url is None and self.state_dir is None:
            raise ValueError("give metrics_url, state_dir or both")
        if self.out_dir is None and self.webhook_url is None:
            raise ValueError("give out_dir, webhook_url or both")
        return self


Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(slots=True)
class Fleet:
    """What the digest reports. Runs and spend are cumulative counters, keyed
    ``agent|outcome`` and ``agent|provider/model``."""

    runs: dict[str, float] = field(default_factory=dict)
    spend: dict[str, float] = field(default_factory=dict)
    #: (window, USD spent, USD limit or None)
    budgets: list[tuple[str, float, float | None]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def read_metrics(ctx: RunContext, url: str) -> Samples:
    """Sample name -> [(labels, value)]. Raises ``TransientError`` when the endpoint fails."""
    try:
        response = await ctx.http.get(url)
        response.raise_for_status()
    except httpx2.HTTPError as exc:
        raise TransientError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


def from_metrics(fleet: Fleet, samples: Samples, runs: bool) -> None:
    def get(name: str) -> list[tuple[dict[str, str], float]]:
        return samples.get(P + name, [])

    if runs:
        fleet.runs = {f"{lab['agent']}|{lab['outcome']}": v for lab, v in get("runs_total")}
    for lab, v in get("llm_cost_usd_total"):
        fleet.spend[f"{lab['agent']}|{lab['provider']}/{lab['model']}"] = v
    limits = {lab["window"]: v for lab, v in get("llm_budget_limit_usd")}
    for lab, v in get("llm_budget_spent_usd"):
        fleet.budgets.append((lab["window"], v, limits.get(lab["window"])))
    limits = {lab["agent"]: v for lab, v in get("llm_agent_budget_limit_usd")}
    for lab, v in get("llm_agent_spent_today_usd"):
        fleet.budgets.append((f"{lab['agent']} today", v, limits.get(lab["agent"])))


def from_state(fleet: Fleet, state_dir: Path, since: datetime | None) -> None:
    """Run totals and errors since ``since`` from ``<agent>.json``; pending approvals from
    the effect ledger (``effects/<agent>.jsonl``, the last line of a key wins)."""
    if not state_dir.is_dir():
        fleet.problems.append(f"{state_dir}: no such directory (is it the daemon's state_dir?)")
        return
    for path in sorted(state_dir.glob("*.json")):
        if path.name.startswith(("_", ".")):  # supervisor documents, temp files
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fleet.problems.append(f"{path}: {exc}")
            continue
        agent = doc.get("agent", path.stem)
        fleet.runs |= {f"{agent}|{k}": float(n) for k, n in doc.get("totals", {}).items()}
        errors = doc.get("errors", [])
        fresh = [
            e
            for e in errors
            if e.get("outcome") != "awaiting_approval"  # listed under approvals
            and (since is None or datetime.fromisoformat(e["at"]) > since)
        ]
        fleet.failures += [{"agent": agent, **e} for e in fresh]
    fleet.failures.sort(key=lambda f: f["at"])
    records: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in sorted((state_dir / "effects").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                records[(rec["agent"], rec["kind"], rec["key"])] = rec
            except (ValueError, KeyError):  # a torn last line while the daemon appends
                continue
    fleet.pending = [r for r in records.values() if r.get("status") == "pending_approval"]


def delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What counters gained since ``before``; a counter that went down was reset."""
    return {k: v - before.get(k, 0.0) if v >= before.get(k, 0.0) else v for k, v in now.items()}


def runs_table(runs: dict[str, float]) -> list[str]:
    by_agent: dict[str, dict[str, float]] = defaultdict(dict)
    for key, n in runs.items():
        agent, outcome = key.split("|", 1)
        by_agent[agent][outcome] = n
    outcomes = sorted({o for by in by_agent.values() for o, n in by.items() if n})
    if not outcomes:
        return []
    out = [f"| agent | {' | '.join(outcomes)} | total |", "|---" * (len(outcomes) + 2) + "|"]
    for agent, by in sorted(by_agent.items()):
        if not any(by.values()):  # no runs since the previous digest
            continue
        cells = " | ".join(f"{by.get(o, 0):.0f}" for o in outcomes)
        out.append(f"| {agent} | {cells} | {sum(by.values()):.0f} |")
    return out


def section(title: str, lines: list[str]) -> list[str]:
    return ["", f"## {title}", "", *(lines or ["None."])]


def render(title: str, fleet: Fleet, before: dict[str, Any], max_failures: int) -> str:
    """The digest in Markdown: what changed since the previous one, and what waits."""
    spend = {k: v for k, v in delta(fleet.spend, before.get("spend", {})).items() if v}
    budgets = [
        f"- {name}: ${spent:.4f} spent, "
        + (f"${limit - spent:.4f} left of ${limit:.2f}" if limit is not None else "no limit")
        for name, spent, limit in fleet.budgets
    ]
    out = [f"# {title}", "", f"Since {before.get('at', 'the start of the records')}."]
    out += section("Runs by outcome", runs_table(delta(fleet.runs, before.get("runs", {}))))
    out += section(
        f"Failures ({len(fleet.failures)})",
        [
            f"- {f['at']} {f['agent']} {f['outcome']}: {f['message'][:300]}"
            for f in fleet.failures[-max_failures:]
        ],
    )
    out += section(
        f"LLM spend: ${sum(spend.values()):.4f}",
        [f"- {k.replace('|', ', ')}: ${v:.4f}" for k, v in sorted(spend.items())],
    )
    out += section("Budget left", budgets)
    out += section(
        f"Approvals pending ({len(fleet.pending)})",
        [
            f"- {r['agent']} {r['kind']} {r['key']!r}: {r.get('reason') or 'no reason given'} "
            f"(`agent-supervisor approve {r.get('approval_id')}`, expires {r.get('expires_at')})"
            for r in fleet.pending
        ],
    )
    if fleet.problems:
        out += section("Could not read", [f"- {p}" for p in fleet.problems])
    return "\n".join(out) + "\n"


def write_file(path: Path, text: str, idempotency_key: str) -> dict[str, Any]:
    """The ``digest`` effect: write the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return {"path": str(path)}


async def digest(ctx: RunContext, params: DigestParams) -> dict[str, Any]:
    """Write the digest of the current period, once."""
    now = ctx.clock.now()
    period = now.strftime(params.period)
    before: dict[str, Any] = ctx.state.get("last", {})
    if before.get("period") == period:
        return {"period": period, "skipped": "already sent for this period"}
    fleet = Fleet()
    with ctx.step("read"):
        if params.state_dir is not None:
            since = datetime.fromisoformat(before["at"]) if "at" in before else None
            from_state(fleet, params.state_dir, since)
        if params.metrics_url is not None:
            samples = await read_metrics(ctx, params.metrics_url)
            from_metrics(fleet, samples, runs=not fleet.runs)  # the state dir's, if any
    text = render(f"Fleet digest {period}", fleet, before, params.max_failures)
    key = f"digest:{period}"
    with ctx.step("send"):
        if params.out_dir is not None:
            path = params.out_dir / f"digest-{period}.md"
            await ctx.effect("digest", key, partial(write_file, path, text))
        if params.webhook_url is not None:
            await ctx.effect("webhook", key, partial(post_webhook, ctx, params.webhook_url, text))
    ctx.state["last"] = {"period": period, "at": now.isoformat(), "runs": fleet.runs}
    ctx.state["last"]["spend"] = fleet.spend
    runs = delta(fleet.runs, before.get("runs", {}))
    return {"period": period, "runs": sum(runs.values()), "failures": len(fleet.failures)}
