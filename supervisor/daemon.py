"""The daemon: one root task group, signals, reload, drain, systemd notifications.

Lifecycle:
- start: lock the state dir, load config and each agent's state, serve metrics, schedule,
  then ``READY=1``.
- SIGHUP: re-read the config; if valid apply the difference (add, remove, reschedule, change
  guards) without touching runs in flight; if invalid keep the old config and say why.
- SIGTERM/SIGINT: stop new fires, let runs in flight finish for up to ``shutdown_grace``,
  cancel the rest (outcome ``cancelled``, state committed), exit 0. A second signal cancels
  runs at once; a third exits immediately with status 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import signal
import socket
import time
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from supervisor import __version__
from supervisor.clock import Clock, SystemClock
from supervisor.cluster.base import NodeNameInUse
from supervisor.config import AgentSpec, LoadedConfig, load_config
from supervisor.control import ControlServer
from supervisor.effects.ledger import open_ledger
from supervisor.effects.service import EffectsService
from supervisor.errors import ConfigError, StateError
from supervisor.guards.breaker import CircuitBreaker
from supervisor.logging import configure_logging, get_logger
from supervisor.metrics import Metrics
from supervisor.ops import Operations
from supervisor.runner import AgentSlot, Runner
from supervisor.scheduler import Scheduler
from supervisor.server import bind_tcp, create_app, serve_http
from supervisor.state import open_store
from supervisor.state.base import AgentState
from supervisor.systemd import Notifier
from supervisor.traces import TraceStore

_log = get_logger()
_T0 = time.monotonic()
#: settings a reload cannot apply: a change is logged as ``config.restart_required``
_RESTART_KEYS = (
    "state_dir",
    "metrics",
    "timezone",
    "schedule_scale",
    "llm",
    "control",
    "traces",
    "store",
    "cluster",
)


def process_age() -> float:
    """Seconds since this process started (from /proc; since import where that is missing)."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 is the start time in clock ticks after boot; the name (field 2) may hold
            # spaces, so count from the closing parenthesis.
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _T0


class StateDirLock:
    """An exclusive lock on the state directory: two daemons never share one."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".agent-supervisor.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises ``StateError`` when another process holds the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateError(
                "*",
                f"state dir {self.path.parent} is in use by another agent-supervisor "
                f"(pid {holder})",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _default_node_name() -> str:
    """The host name: a node's name in the cluster when the config gives none."""
    return socket.gethostname() or "node"


class StartupError(Exception):
    """Something the daemon needs could not be had; logged as ``event`` with ``fields``."""

    def __init__(self, event: str, **fields: Any) -> None:
        self.event = event
        self.fields = fields
        super().__init__(event)


class _LazyHttp:
    """The ``http`` service, built on the first ``ctx.http``: httpx2 and its TLS context take
    about 0.1 s to load, which would all come before READY, for a service many fleets never use.
    """

    def __init__(self, clock: Clock, metrics: Metrics) -> None:
        self._clock = clock
        self._metrics = metrics
        self._built: Any = None

    def for_run(self, ctx: Any) -> Any:
        if self._built is None:
            from supervisor.http import HttpService

            self._built = HttpService(self._clock, self._metrics)
        return self._built.for_run(ctx)

    async def aclose(self) -> None:
        if self._built is not None:
            await self._built.aclose()


def _shielded(fn: Any) -> Any:
    """Wrap an async close so cancellation of the surrounding scope cannot cut it short."""

    async def close() -> None:
        with anyio.CancelScope(shield=True):
            await fn()

    return close


class Daemon:
    """The long-running supervisor process."""

    def __init__(
        self,
        config_path: str | Path,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.environ = dict(os.environ if environ is None else environ)
        self.clock = clock or SystemClock()
        self.notifier = Notifier(self.environ)
        self.metrics = Metrics()
        self.slots: dict[str, AgentSlot] = {}
        self.config: LoadedConfig | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._stop = anyio.Event()
        self._http_stop = anyio.Event()
        self._metrics_sock: socket.socket | None = None
        self.llm: Any = None
        self.effects: EffectsService | None = None
        self.traces: TraceStore | None = None
        self._force = anyio.Event()
        self._signals = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._scheduler: Scheduler | None = None
        self._runner: Runner | None = None
        self._ready = False
        #: cluster mode (``store: postgresql://``): this node's name, pool and protocol
        self.node_name: str | None = None
        self._database: Any = None
        self.cluster: Any = None
        self._exit_status = 0

    # -- entry point --------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; returns the process exit status."""
        try:
            config = load_config(self.config_path, environ=self.environ)
        except ConfigError as exc:
            configure_logging()
            for problem in exc.problems:
                _log.error("config.invalid", problem=str(problem))
            return 1
        configure_logging(config.settings.log_level, secrets=config.secret_values)
        self.config = config
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._open(config, stack)
            except StartupError as exc:
                _log.error(exc.event, **exc.fields)
                return 1
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._start(tg, config)
                await self._stop.wait()
                await self._shutdown()
                tg.cancel_scope.cancel()
        self.notifier.close()
        _log.info("daemon.stopped", exit_status=self._exit_status)
        return self._exit_status

    async def _open(
        self, config: LoadedConfig, stack: contextlib.AsyncExitStack, *, serve: bool = True
    ) -> None:
        """Acquire everything the daemon holds; each is released by ``stack`` in reverse.

        Raises ``StartupError`` naming what could not be had.
        """
        settings = config.settings
        # The state dir stays this node's own (traces, the control socket, the LLM cache)
        # even when durable state lives in PostgreSQL.
        lock = StateDirLock(settings.state_dir)
        store = self._build_store(config)
        try:
            lock.acquire()
            stack.callback(lock.release)
            await store.open()
        except (StateError, OSError) as exc:
            raise StartupError("state.unavailable", error=str(exc)) from None
        stack.push_async_callback(_shielded(store.close))
        if settings.clustered:
            await self._join_cluster(config, store, stack)
        stale = getattr(store, "stale_temp_files_removed", 0)
        if stale:
            _log.warning("state.stale_temp_files_removed", count=stale)
        if settings.metrics.enabled and serve:
            try:
                self._metrics_sock = bind_tcp(settings.metrics.host, settings.metrics.port)
            except OSError as exc:
                raise StartupError(
                    "metrics.bind_failed", listen=settings.metrics.listen, error=exc.strerror
                ) from None
        services: dict[str, Any] = {"metrics": self.metrics}
        if settings.llm.providers:
            from supervisor.llm.client import LLMService

            budget = None
            if self._database is not None:
                from supervisor.llm.budget_pg import PgBudgetLedger

                budget = PgBudgetLedger(self._database, self.clock, settings.llm.budgets)
            llm = LLMService(
                settings.llm,
                config.secrets,
                store=store,
                clock=self.clock,
                metrics=self.metrics,
                state_dir=settings.state_dir,
                budget=budget,
            )
            try:
                await llm.start()
            except StateError as exc:
                raise StartupError("llm.budget_unavailable", error=str(exc)) from None
            stack.push_async_callback(_shielded(llm.aclose))
            services["llm"] = self.llm = llm
        http = _LazyHttp(self.clock, self.metrics)
        stack.push_async_callback(_shielded(http.aclose))
        services["http"] = http
        self.effects = await self._open_effects(config, stack)
        services["effects"] = self.effects
        if settings.traces.enabled:
            self.traces = TraceStore(
                settings.state_dir / "traces", max_bytes=settings.traces.max_bytes_per_agent
            )
        self._runner = Runner(
            store=store,
            metrics=self.metrics,
            clock=self.clock,
            max_concurrent=settings.max_concurrent_runs,
            keep_errors=settings.keep_errors,
            services=services,
            traces=self.traces,
            cluster=self.cluster,
        )
        if self.cluster is not None:
            self.cluster.ledger = self.effects.ledger
            self.cluster.budget = self.llm.ledger if self.llm is not None else None

    def _build_store(self, config: LoadedConfig) -> Any:
        """JSON files in ``state_dir``, or PostgreSQL when ``store`` names it."""
        settings = config.settings
        if not settings.clustered:
            return open_store(settings.state_dir)
        from supervisor.state.postgres import DEFAULT_SCHEMA, Database, PostgresStore, split_schema

        dsn, schema = split_schema(settings.store)
        self.node_name = settings.cluster.node or _default_node_name()
        self._database = Database(
            dsn,
            schema=schema or DEFAULT_SCHEMA,
            max_size=max(10, settings.max_concurrent_runs + 4),
            application_name=f"agent-supervisor:{self.node_name}"[:63],
        )
        return PostgresStore(self._database)

    async def _join_cluster(
        self, config: LoadedConfig, store: Any, stack: contextlib.AsyncExitStack
    ) -> None:
        """Register this node (before the ledger adopts the intents of its name's previous
        process: the name must be ours first)."""
        from supervisor.cluster.claims import PgFireClaims
        from supervisor.cluster.metrics import ClusterMetrics
        from supervisor.cluster.node import ClusterNode
        from supervisor.cluster.nodes import PgNodeRegistry

        assert self._database is not None and self.node_name is not None
        cfg = config.settings.cluster
        node = ClusterNode(
            cfg,
            node=self.node_name,
            claims=PgFireClaims(self._database),
            registry=PgNodeRegistry(
                self._database,
                self.node_name,
                config_hash=config.fleet_digest,
                version=__version__,
                max_age_s=cfg.node_ttl,
            ),
            metrics=ClusterMetrics(self.metrics),
            clock=self.clock,
        )
        try:
            await node.join()
        except NodeNameInUse as exc:
            raise StartupError("cluster.node_name_in_use", node=exc.node, error=str(exc)) from None
        except StateError as exc:
            raise StartupError("cluster.unavailable", error=str(exc)) from None
        stack.push_async_callback(node.leave)
        self.cluster = node

    async def _open_effects(
        self, config: LoadedConfig, stack: contextlib.AsyncExitStack
    ) -> EffectsService:
        settings = config.settings
        if self._database is not None:
            from supervisor.effects.ledger.postgres import PostgresLedger

            ledger: Any = PostgresLedger(
                self._database,
                node=self.node_name or "",
                clock=self.clock,
                node_ttl_s=settings.cluster.node_ttl,
            )
        else:
            ledger = open_ledger(
                settings.state_dir,
                clock=self.clock,
                compact_bytes=settings.effects.ledger.compact_bytes,
            )
        try:
            await ledger.open()
        except (StateError, OSError) as exc:
            raise StartupError("effects.ledger_unavailable", error=str(exc)) from None
        stack.push_async_callback(_shielded(ledger.close))
        report = getattr(ledger, "report", None)
        if report is not None and (report.torn or report.corrupt or report.unknown_marked):
            _log.warning(
                "effects.ledger_recovered",
                torn=report.torn,
                corrupt=report.corrupt,
                unknown=report.unknown_marked,
            )
        return EffectsService(
            ledger,
            self.clock,
            config=settings.effects,
            metrics=self.metrics,
            notifier=self._approval_notifier(config),
        )

    def _approval_notifier(self, config: LoadedConfig) -> Any:
        approval = config.settings.effects.approval
        url = approval.webhook_url
        if approval.webhook_url_secret:
            url = config.secrets.get(approval.webhook_url_secret.lower())
            if url is None:
                _log.warning("approval.webhook_secret_missing", secret=approval.webhook_url_secret)
        if not url:
            return None
        from supervisor.notify import webhook_notifier  # imports httpx2: only when configured

        return webhook_notifier(url, approval.webhook_format, approval.notify_timeout)

    async def _start(self, tg: anyio.abc.TaskGroup, config: LoadedConfig) -> None:
        settings = config.settings
        tg.start_soon(self._signal_loop)
        if self._metrics_sock is not None:
            sock = self._metrics_sock
            self.metrics_address = sock.getsockname()[:2]
            app = create_app(self.metrics, health=self._health)
            tg.start_soon(partial(serve_http, app, sock, shutdown=self._http_stop))
            _log.info(
                "metrics.listening", host=self.metrics_address[0], port=self.metrics_address[1]
            )
        assert self._runner is not None
        self._scheduler = Scheduler(
            self._on_fire,
            timezone=settings.timezone,
            misfire_grace=settings.misfire_grace,
            on_missed=self._on_missed,
            scale=settings.schedule_scale,
        )
        for spec in config.agents.values():
            await self._add_agent(spec)
        # What is loaded by now lives as long as the daemon: keep it out of the collector's
        # scans. A run leaves no reference cycles behind, so the collector is only needed for
        # rare garbage (failed runs' tracebacks): let it wait for 100,000 new objects rather
        # than 700, or a shared tick of 1,000 runs in flight triggers ~100 collections.
        gc.freeze()
        gc.set_threshold(100_000, 10, 10)
        if settings.control.enabled:
            path = config.control_socket
            server = ControlServer(path, Operations(self).handlers(), mode=settings.control.mode)
            try:
                await tg.start(server.serve)
            except OSError as exc:
                _log.error("control.unavailable", socket=str(path), error=str(exc))
        tg.start_soon(self._approvals_loop)
        if self.cluster is not None:
            tg.start_soon(self._cluster_loop)
        self._scheduler.start()
        self._update_counts()
        if self.notifier.watchdog_interval:
            tg.start_soon(self._watchdog)
        self._ready = True
        ready_s = round(process_age(), 3)
        self.notifier.ready(f"running {len(self.slots)} agents")
        _log.info(
            "daemon.ready",
            version=__version__,
            agents=len(self.slots),
            config=str(self.config_path),
            state_dir=str(settings.state_dir),
            ready_s=ready_s,
        )

    # -- what the control API needs ------------------------------------------------------------

    version = __version__

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def in_flight(self) -> int:
        return self._runner.in_flight if self._runner is not None else 0

    async def store_load(self, agent: str) -> AgentState:
        """The agent's state as the store holds it now. Raises ``StateError``."""
        assert self._runner is not None
        return await self._runner.store.load(agent)

    def next_fire(self, agent: str) -> datetime | None:
        return self._scheduler.next_fire(agent) if self._scheduler is not None else None

    def agent_spend_today(self) -> dict[str, tuple[float | None, float | None]]:
        """Agent -> (USD spent and reserved today, daily limit or None)."""
        if self.llm is None:
            return {}
        out: dict[str, tuple[float | None, float | None]] = {}
        for w in self.llm.ledger.snapshot():
            if w.name in ("agent_day", "per_agent_day"):
                out[str(w.key)] = (round(w.spent_usd + w.reserved_usd, 6), w.limit_usd)
        return out

    def start_trigger(self, agent: str) -> None:
        """Run ``agent`` now in the background (``trigger`` without ``--wait``)."""
        assert self._tg is not None
        self._tg.start_soon(self.trigger, agent)

    @staticmethod
    def record_doc(record: Any) -> dict[str, Any]:
        return {
            "agent": record.agent,
            "run_id": record.run_id,
            "outcome": record.outcome.value,
            "duration_s": round(record.duration_s, 6),
            "steps": record.steps,
            "attempts": record.attempts,
            "error": record.error,
            "result": record.result,
            "partial": record.partial,
        }

    async def set_paused(self, slot: AgentSlot, paused: bool) -> None:
        """Persist the agent's pause flag (it survives restarts). Raises ``StateError``."""
        assert self._runner is not None
        store = self._runner.store
        set_flag = getattr(store, "set_paused", None)
        if set_flag is not None:
            # Shared store: set the flag alone, in the database, so that a run of the agent
            # committing on another node meanwhile keeps its data (and this flag).
            new = await set_flag(slot.name, paused)
        else:
            state = await self._runner.ensure_state(slot)
            if state is None:
                raise StateError(slot.name, slot.blocked or "state unavailable")
            new = state.model_copy(update={"paused": paused})
            await store.commit(new)
        slot.state = new
        _log.info("agent.paused" if paused else "agent.resumed", agent=slot.name)
        self._export_interval(slot)
        self._update_counts()

    async def reload_verdict(self) -> tuple[bool, list[str]]:
        """Reload now and say whether it was applied, with the problems if not."""
        try:
            load_config(self.config_path, environ=self.environ)
        except ConfigError as exc:
            await self.reload()  # logs, counts and keeps the old config
            return False, [str(p) for p in exc.problems]
        return await self.reload(), []

    async def refresh_approval_metrics(self) -> None:
        if self.effects is None:
            return
        from supervisor.effects.ledger import EffectStatus

        pending = await self.effects.pending()
        now = self.clock.now()
        oldest = max(((now - r.requested_at).total_seconds() for r in pending), default=0.0)
        unknown = await self.effects.ledger.list(status=EffectStatus.UNKNOWN)
        self.metrics.set_approvals(len(pending), oldest, len(unknown))

    async def _approvals_loop(self) -> None:
        """Expire approvals that were not decided in time; keep their metrics current."""
        while True:
            if self.effects is not None:
                expired = await self.effects.expire_due()
                for request in expired:
                    _log.warning("approval.expired", approval=request.id, agent=request.agent)
                await self.refresh_approval_metrics()
            await anyio.sleep(30)

    async def _cluster_loop(self) -> None:
        assert self.cluster is not None and self._runner is not None
        runner = self._runner

        def gone() -> None:
            self._exit_status = 1
            self._stop.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(self._cluster_sync)
            await self.cluster.run(
                in_flight=lambda: runner.in_flight, on_abandoned=self._on_abandoned, on_gone=gone
            )

    async def _cluster_sync(self) -> None:
        """Every heartbeat, learn what other nodes did: last run and success times (the
        staleness metrics and alerts of every node tell the cluster's truth) and pause flags
        (a paused agent is not expected to succeed, on any node)."""
        from supervisor.cluster.node import uninterrupted

        assert self.config is not None and self._runner is not None
        store: Any = self._runner.store
        while True:
            await self.clock.sleep(self.config.settings.cluster.heartbeat_interval)
            summaries: dict[str, Any] = {}
            try:
                with uninterrupted():
                    summaries = await store.summaries()
            except StateError as exc:
                _log.warning("cluster.sync_failed", error=str(exc))
                continue
            changed = False
            for name, (last_run, last_ok, paused) in summaries.items():
                slot = self.slots.get(name)
                if slot is None:
                    continue
                self.metrics.seen_elsewhere(name, last_run_ts=last_run, last_success_ts=last_ok)
                if slot.state is not None and slot.state.paused != paused and not slot.running:
                    slot.state = slot.state.model_copy(update={"paused": paused})
                    self._export_interval(slot)
                    changed = True
            if changed:
                self._update_counts()

    async def _on_abandoned(self, claim: Any) -> None:
        """Apply the agent's takeover policy to a claim whose node stopped renewing it."""
        assert self.config is not None and self._tg is not None and self._runner is not None
        slot = self.slots.get(claim.agent)
        cluster_cfg = self.config.settings.cluster
        if slot is None or self._stop.is_set():
            return
        policy = slot.spec.config.takeover or cluster_cfg.takeover
        if policy != "rerun":
            _log.info("cluster.takeover_skipped", agent=claim.agent, policy=policy)
            return
        if claim.attempt > cluster_cfg.max_takeovers:
            _log.error(
                "cluster.takeover_gave_up",
                agent=claim.agent,
                planned_at=claim.planned_at.isoformat(),
                attempts=claim.attempt,
                hint="the fire was abandoned on every node that ran it (does it crash its "
                "node?): the next fire runs as usual",
            )
            return
        self._tg.start_soon(
            partial(self._runner.fire, slot, claim.planned_at, "takeover", abandoned=claim)
        )

    def _health(self) -> bool:
        return self._ready and not self._stop.is_set()

    # -- agents -------------------------------------------------------------------------------

    async def _add_agent(self, spec: AgentSpec) -> None:
        assert self._runner is not None and self._scheduler is not None
        g = spec.guards
        slot = AgentSlot(spec, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, self.clock))
        self.slots[spec.name] = slot
        state = await self._adopt_state(slot)
        if spec.config.enabled:
            planned = state.last_planned_fire if state is not None else None
            self._scheduler.add(spec.name, spec.config.schedule, last_planned=planned)

    async def _adopt_state(self, slot: AgentSlot) -> AgentState | None:
        """Load the agent's state; restore its breaker and seed its metrics from it."""
        assert self._runner is not None
        state = await self._runner.ensure_state(slot)
        if state is not None:
            slot.restore_breaker(state.breaker, self.clock)
        last = state.last_run.finished_at.timestamp() if state and state.last_run else None
        ok = state.last_success_at.timestamp() if state and state.last_success_at else None
        self.metrics.add_agent(slot.name, last_run_ts=last, last_success_ts=ok)
        self.metrics.set_circuit(slot.name, slot.breaker.state.code)
        self._export_interval(slot)
        return state

    def _export_interval(self, slot: AgentSlot) -> None:
        from supervisor.scheduler import expected_interval

        config = slot.spec.config
        tz = self.config.settings.timezone if self.config else "UTC"
        paused = slot.state is not None and slot.state.paused
        # A paused or disabled agent is not expected to succeed: no interval, no alert.
        seconds = expected_interval(config.schedule, tz) if config.enabled and not paused else 0.0
        if config.schedule.every is not None and self.config is not None:
            seconds *= self.config.settings.schedule_scale
        self.metrics.set_expected_interval(slot.name, seconds)

    def _on_fire(self, agent: str, planned: datetime) -> None:
        slot = self.slots.get(agent)
        if slot is None or self._tg is None or self._stop.is_set():
            return
        assert self._runner is not None
        self._tg.start_soon(self._runner.fire, slot, planned)

    def _on_missed(self, agent: str, planned: datetime) -> None:
        _log.warning("run.missed", agent=agent, planned_at=planned.isoformat())

    async def run_once(self, agent: str) -> tuple[Any, AgentSlot | None]:
        """Open everything a run needs (no scheduler, no sockets), run ``agent`` once.

        Returns ``(record, slot)``; the record is None when the agent could not run. Raises
        ``StartupError`` when the state dir, the ledger or the budget cannot be opened, and
        ``KeyError`` for an unknown agent.
        """
        assert self.config is not None
        spec = self.config.agents[agent]
        async with contextlib.AsyncExitStack() as stack:
            await self._open(self.config, stack, serve=False)
            assert self._runner is not None and self._scheduler is None
            g = spec.guards
            slot = AgentSlot(
                spec, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, self.clock)
            )
            self.slots[spec.name] = slot
            await self._adopt_state(slot)
            return await self._runner.fire(slot, None, trigger="manual"), slot

    async def trigger(self, agent: str) -> Any:
        """Run ``agent`` now, outside its schedule (same admission and guards)."""
        assert self._runner is not None
        return await self._runner.fire(self.slots[agent], None, trigger="manual")

    def _update_counts(self) -> None:
        enabled = sum(1 for s in self.slots.values() if s.spec.config.enabled)
        paused = sum(1 for s in self.slots.values() if s.state is not None and s.state.paused)
        self.metrics.set_agent_counts(configured=len(self.slots), enabled=enabled, paused=paused)

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config and apply it; on any problem keep running the old one."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path, environ=self.environ)
        except ConfigError as exc:
            self.metrics.config_reload(False, time.time())
            for problem in exc.problems:
                _log.error("config.reload_failed", problem=str(problem))
            self.notifier.ready("reload failed: kept the previous config")
            return False
        changes = await self._apply(new)
        self.metrics.config_reload(True, time.time())
        _log.info("config.reloaded", **changes)
        self.notifier.ready(f"running {len(self.slots)} agents")
        return True

    async def _apply(self, new: LoadedConfig) -> dict[str, Any]:
        assert self.config is not None and self._runner and self._scheduler
        old = self.config
        added, removed, changed = [], [], []
        for name in list(self.slots):
            if name not in new.agents:
                self._scheduler.remove(name)
                self.slots.pop(name).removed = True
                self.metrics.forget_agent(name)
                removed.append(name)
        for name, spec in new.agents.items():
            slot = self.slots.get(name)
            if slot is None:
                await self._add_agent(spec)
                added.append(name)
                continue
            if slot.blocked is not None:  # the operator may have fixed the state file
                slot.blocked, slot.state = None, None
                await self._adopt_state(slot)
            old_spec = slot.spec
            if old_spec.config == spec.config and old_spec.guards == spec.guards:
                continue
            changed.append(name)
            slot.spec = spec  # runs in flight keep the spec they started with
            g, og = spec.guards, old_spec.guards
            if (g.circuit_failures, g.circuit_cooldown) != (
                og.circuit_failures,
                og.circuit_cooldown,
            ):
                slot.restore_breaker(slot.breaker.snapshot(), self.clock)
            sched_changed = (old_spec.config.schedule, old_spec.config.enabled) != (
                spec.config.schedule,
                spec.config.enabled,
            )
            if sched_changed:
                self._export_interval(slot)
                self._scheduler.remove(name)
                if spec.config.enabled:
                    self._scheduler.add(name, spec.config.schedule)
        self._apply_settings(old, new)
        if self.effects is not None:
            self.effects.config = new.settings.effects
        self.config = new
        self._update_counts()
        return {"added": added, "removed": removed, "changed": changed}

    def _apply_settings(self, old: LoadedConfig, new: LoadedConfig) -> None:
        """Apply the settings a reload can apply; log the ones that need a restart."""
        assert self._runner is not None and self._scheduler is not None
        s_old, s_new = old.settings, new.settings
        self._runner.limiter.total_tokens = s_new.max_concurrent_runs
        self._runner.keep_errors = s_new.keep_errors
        self._scheduler.set_misfire_grace(s_new.misfire_grace)
        configure_logging(s_new.log_level, secrets=new.secret_values)
        restart_needed = [
            key for key in _RESTART_KEYS if getattr(s_old, key) != getattr(s_new, key)
        ]
        if restart_needed:
            _log.warning("config.restart_required", keys=restart_needed)
        if self.cluster is not None:
            # The other nodes compare it with theirs at their next heartbeat.
            self.cluster.set_config_hash(new.fleet_digest)

    # -- signals and shutdown -----------------------------------------------------------------

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not self._stop.is_set():
                        await self.reload()
                    continue
                self._signals += 1
                name = signal.Signals(signum).name
                if self._signals == 1:
                    _log.info("daemon.stop_requested", signal=name)
                    self._stop.set()
                elif self._signals == 2:
                    _log.warning("daemon.force_stop", signal=name)
                    self._force.set()
                else:
                    _log.error("daemon.exit_now", signal=name)
                    os._exit(1)

    async def _shutdown(self) -> None:
        assert self._runner is not None and self.config is not None
        grace = self.config.settings.shutdown_grace
        self._ready = False
        self._runner.stopping = True
        if self._scheduler is not None:
            self._scheduler.shutdown()
        in_flight = self._runner.in_flight
        self.notifier.stopping(f"draining {in_flight} runs")
        _log.info("daemon.draining", in_flight=in_flight, grace_s=grace)
        with anyio.move_on_after(grace):
            async with anyio.create_task_group() as tg:

                async def forced() -> None:
                    await self._force.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(forced)
                await self._runner.wait_idle()
                tg.cancel_scope.cancel()
        if self._runner.in_flight:
            _log.warning("daemon.cancelling_runs", count=self._runner.cancel_all())
            # Cancelled runs still run their cleanup (bounded by cleanup_grace) and commit
            # their state (shielded); bound the wait anyway.
            cleanup = max((s.spec.guards.cleanup_grace for s in self.slots.values()), default=5.0)
            with anyio.move_on_after(cleanup + 10):
                await self._runner.wait_idle()
        self._http_stop.set()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)
