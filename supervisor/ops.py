"""What the control API can do: the handlers behind ``agent-supervisor status``, ``runs``, ...

Each handler takes the request's ``args`` and an ``emit`` for progress lines and returns the
result (JSON-ready). ``ControlError`` carries the refusals the CLI prints.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from supervisor.control import ControlError, Emit, Handler
from supervisor.durations import format_duration
from supervisor.errors import StateError

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.runner import AgentSlot


class Operations:
    """The operations of the control API, bound to one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def handlers(self) -> dict[str, Handler]:
        """Operation name -> handler."""
        names = (
            "status",
            "runs",
            "trace",
            "trigger",
            "pause",
            "resume",
            "reload",
            "state",
            "approvals",
            "approve",
            "reject",
            "resolve",
        )
        return {name: getattr(self, name) for name in names}

    def slot(self, args: dict[str, Any]) -> AgentSlot:
        name = str(args.get("agent", ""))
        found = self.daemon.slots.get(name)
        if found is None:
            known = ", ".join(sorted(self.daemon.slots)) or "none"
            raise ControlError("unknown_agent", f"unknown agent {name!r} (configured: {known})")
        return found

    async def status(self, args: dict[str, Any], emit: Emit) -> Any:
        now = time.time()
        spend = self.daemon.agent_spend_today()
        cluster = self.daemon.cluster
        fresh: dict[str, Any] = {}
        latest: dict[str, Any] = {}
        cluster_doc = None
        if cluster is not None:
            # Another node may have run (or paused) an agent since this node last did: read
            # what the database holds, not this node's copy.
            cluster_doc = await cluster.status()
            latest = cluster_doc.pop("latest")
            for name in self.daemon.slots:
                try:
                    fresh[name] = await self.daemon.store_load(name)
                except StateError:
                    pass
        rows = []
        for s in self.daemon.slots.values():
            st = fresh.get(s.name, s.state)
            sched = s.spec.config.schedule
            last = st.last_run if st else None
            ok = st.last_success_at.timestamp() if st and st.last_success_at else None
            nxt = self.daemon.next_fire(s.name)
            rows.append(
                {
                    "agent": s.name,
                    "schedule": f"cron {sched.cron}"
                    if sched.cron
                    else f"every {format_duration(sched.every or 0)}",
                    "enabled": s.spec.config.enabled,
                    "paused": bool(st and st.paused),
                    "running": s.running,
                    "blocked": s.blocked,
                    "next_fire": nxt.isoformat(timespec="seconds") if nxt else None,
                    "last_outcome": last.outcome if last else None,
                    "last_run_at": last.finished_at.isoformat(timespec="seconds") if last else None,
                    "last_success_age_s": round(now - ok, 1) if ok else None,
                    "circuit": s.breaker.state.value,
                    "spend_today_usd": spend.get(s.name, (None, None))[0],
                    "budget_today_usd": spend.get(s.name, (None, None))[1],
                }
            )
            if cluster is not None:
                claim = latest.get(s.name)
                rows[-1]["node"] = claim["node"] if claim else None
                rows[-1]["claim"] = claim
        out = {"agents": rows, "in_flight": self.daemon.in_flight, "version": self.daemon.version}
        if cluster_doc is not None:
            out["cluster"] = cluster_doc
        return out

    async def runs(self, args: dict[str, Any], emit: Emit) -> Any:
        s = self.slot(args)
        limit = int(args.get("limit", 20))
        if self.daemon.traces is None:
            last = s.state.last_run if s.state else None
            return [last.model_dump(mode="json")] if last else []
        return await self.daemon.traces.runs(s.name, limit)

    async def trace(self, args: dict[str, Any], emit: Emit) -> Any:
        run_id = str(args.get("run_id", ""))
        if self.daemon.traces is None:
            raise ControlError("no_traces", "traces are disabled (traces.enabled: false)")
        found = await self.daemon.traces.find(run_id, list(self.daemon.slots))
        if found is None:
            raise ControlError("unknown_run", f"no trace of run {run_id!r}")
        return found

    async def trigger(self, args: dict[str, Any], emit: Emit) -> Any:
        s = self.slot(args)
        if self.daemon.stopping:
            raise ControlError("stopping", "the daemon is stopping")
        if not args.get("wait"):
            self.daemon.start_trigger(s.name)
            return {"started": True}
        done = anyio.Event()
        out: dict[str, Any] = {}

        async def run() -> None:
            record = await self.daemon.trigger(s.name)
            out["record"] = record
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not done.is_set():
                with anyio.move_on_after(0.5):
                    await done.wait()
                live = s.live
                if live is not None and not done.is_set():
                    await emit({"event": "progress", "run_id": live.run_id, "steps": live.steps})
        record = out.get("record")
        if record is None:
            raise ControlError("not_run", f"agent {s.name!r} could not run: {s.blocked}")
        return self.daemon.record_doc(record)

    async def pause(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.set_paused(args, True)

    async def resume(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.set_paused(args, False)

    async def set_paused(self, args: dict[str, Any], paused: bool) -> Any:
        s = self.slot(args)
        try:
            await self.daemon.set_paused(s, paused)
        except StateError as exc:
            raise ControlError("state", str(exc)) from None
        return {"agent": s.name, "paused": paused}

    async def reload(self, args: dict[str, Any], emit: Emit) -> Any:
        ok, problems = await self.daemon.reload_verdict()
        if not ok:
            raise ControlError("config_invalid", "\n".join(problems))
        return {"reloaded": True}

    async def state(self, args: dict[str, Any], emit: Emit) -> Any:
        s = self.slot(args)
        if s.state is None:
            raise ControlError("state", f"agent {s.name!r}: {s.blocked or 'state not loaded'}")
        return s.state.model_dump(mode="json")

    def effects(self) -> Any:
        if self.daemon.effects is None:
            raise ControlError("no_effects", "side effects are not configured")
        return self.daemon.effects

    async def approvals(self, args: dict[str, Any], emit: Emit) -> Any:
        return [r.to_dict() for r in await self.effects().pending()]

    async def approve(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.decide(args, True)

    async def reject(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.decide(args, False)

    async def decide(self, args: dict[str, Any], ok: bool) -> Any:
        from supervisor.effects.errors import ApprovalError

        by = str(args.get("by", "cli"))
        try:
            if ok:
                request = await self.effects().approve(str(args.get("id", "")), by)
            else:
                request = await self.effects().reject(
                    str(args.get("id", "")), by, args.get("reason")
                )
        except ApprovalError as exc:
            raise ControlError("approval", str(exc)) from None
        await self.daemon.refresh_approval_metrics()
        return request.to_dict()

    async def resolve(self, args: dict[str, Any], emit: Emit) -> Any:
        from supervisor.effects.errors import EffectNotFound, InvalidTransition

        try:
            record = await self.effects().resolve(
                str(args.get("agent", "")),
                str(args.get("kind", "")),
                str(args.get("key", "")),
                happened=bool(args.get("happened")),
                by=str(args.get("by", "cli")),
                note=args.get("note"),
            )
        except (EffectNotFound, InvalidTransition) as exc:
            raise ControlError("effect", str(exc)) from None
        return record.to_doc()
