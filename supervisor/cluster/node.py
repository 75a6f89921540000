"""This daemon as one node of a cluster: claiming fires, keeping leases, watching the others.

The runner asks ``ClusterNode`` before every run (``claim``) and commits through it
(``commit``, fenced); the daemon starts its background work (``run``):

- heartbeat, every ``heartbeat_interval``: this node's row in ``nodes`` (what it runs, its
  fleet digest); a node whose name was taken over by another process stops.
- lease check, every ``check_interval``: running claims past their lease are marked
  ``abandoned`` (each by exactly one node) and handed to ``on_abandoned``, which applies
  the agent's takeover policy; intents of nodes gone silent become ``unknown`` in the
  effect ledger.
- config check, with the heartbeat: live nodes whose fleet digest differs are reported
  (a log line when the set changes, and a gauge), never merged.
- pruning, hourly: finished claims older than ``keep_claims``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import anyio

from supervisor.clock import Clock
from supervisor.cluster.base import Claim, FireClaims, NodeInfo, NodeNameInUse, NodeRegistry
from supervisor.cluster.lease import keep_lease
from supervisor.cluster.metrics import ClusterMetrics
from supervisor.config import ClusterConfig
from supervisor.errors import StateError
from supervisor.logging import get_logger
from supervisor.state.base import AgentState, StateStore

__all__ = ["ClusterNode", "uninterrupted"]

_log = get_logger()
_PRUNE_EVERY = 3600.0


class ClusterNode:
    """One node's share of the cluster protocol (see the module docstring)."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        node: str,
        claims: FireClaims,
        registry: NodeRegistry,
        metrics: ClusterMetrics,
        clock: Clock,
        ledger: Any = None,
        budget: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.claims = claims
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        #: the effect ledger (its orphaned intents are reaped with the lease check)
        self.ledger = ledger
        #: the cluster budget ledger (its old windows are pruned)
        self.budget = budget
        #: live nodes whose fleet digest differs from ours, as last seen
        self.mismatched: list[NodeInfo] = []
        self.live: list[NodeInfo] = []
        self._registered = False
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"ClusterNode({self.node!r})"

    # -- joining and leaving ------------------------------------------------------------------

    async def join(self) -> None:
        """Register this node, waiting for a dead predecessor's heartbeat to go stale.

        A node restarted right after a crash finds its own name still fresh in ``nodes``;
        it waits up to ``node_ttl`` plus two heartbeats for it to age, then gives up with
        ``NodeNameInUse`` (another live process really has the name). Raises ``StateError``
        when the database cannot be reached.
        """
        waited_since = self.clock.monotonic()
        limit = self.config.node_ttl + 2 * self.config.heartbeat_interval
        while True:
            try:
                await self.registry.register()
                break
            except NodeNameInUse as exc:
                waited = self.clock.monotonic() - waited_since
                if waited >= limit:
                    raise
                if waited == 0:
                    _log.warning(
                        "cluster.node_name_in_use",
                        node=self.node,
                        holder=exc.incarnation,
                        seen_s_ago=round(exc.age_s, 1),
                        wait_up_to_s=round(limit, 1),
                    )
                await self.clock.sleep(min(1.0, self.config.heartbeat_interval))
        self._registered = True
        self.metrics.joined(self.node, self.registry.config_hash)
        _log.info(
            "cluster.joined",
            node=self.node,
            lease_s=self.config.lease,
            check_interval_s=self.config.check_interval,
        )

    def set_config_hash(self, digest: str) -> None:
        """A reload changed the fleet: announce the new digest with the next heartbeat."""
        if self.registry.config_hash != digest:
            self.registry.config_hash = digest
            self.metrics.joined(self.node, digest)
            _log.info("cluster.config_changed", node=self.node, config_hash=digest)

    async def leave(self) -> None:
        """Remove this node's heartbeat (clean shutdown, runs drained)."""
        if not self._registered:
            return
        self._registered = False
        with anyio.CancelScope(shield=True):
            try:
                await self.registry.deregister()
            except StateError as exc:
                _log.warning("cluster.leave_failed", node=self.node, error=str(exc))

    # -- one fire ----------------------------------------------------------------------------

    async def claim(
        self, agent: str, planned_at: datetime, *, run_id: str, slots: int, in_flight: int
    ) -> Claim | None:
        """Wait ``claim_delay`` for the runs in flight (unless this node was the only live one
        at its last heartbeat), then claim the fire (see ``FireClaims.claim``). Raises
        ``StateError`` when the database cannot be reached."""
        cfg = self.config
        # A random part of one step breaks the ties between idle nodes: all of them see a
        # tick's fires at the same moment, and without it the node whose clock or event loop
        # is a little ahead would win every fire of a small tick. (Claims under way are not
        # counted: the wait holds a global run slot, and a tick's losing claims would then
        # throttle the node.)
        busy = max(0, in_flight) + self._rng.random()
        delay = min(cfg.claim_delay_max, busy * cfg.claim_delay_per_run)
        try:
            # Alone (as last seen), there is nobody to leave the fire to: claim at once.
            if delay > 0 and len(self.live) != 1:
                await self.clock.sleep(delay)
            t0 = self.clock.monotonic()
            claim = await self.claims.claim(
                agent, planned_at, self.node, cfg.lease, run_id=run_id, slots=slots
            )
        except StateError:
            self.metrics.claim("failed", None)
            raise
        elapsed = self.clock.monotonic() - t0
        if claim is None:
            self.metrics.claim("elsewhere", elapsed)
        elif claim.node == self.node and claim.status.value == "running":
            self.metrics.claim("won", elapsed)
        else:
            self.metrics.claim("overlap", elapsed)
        return claim

    async def take_over(self, claim: Claim, run_id: str) -> Claim | None:
        """Claim an abandoned fire for this node; None when another node was first."""
        taken = await self.claims.takeover(claim, self.node, self.config.lease, run_id=run_id)
        if taken is not None:
            self.metrics.takeover()
            _log.warning(
                "cluster.takeover",
                agent=claim.agent,
                planned_at=claim.planned_at.isoformat(),
                abandoned_node=claim.abandoned_node,
                attempt=taken.attempt,
                run_id=run_id,
            )
        return taken

    def keep(self, claim: Claim, on_lost: Callable[[], None]) -> Any:
        """Renew ``claim``'s lease while the run goes on; ``on_lost`` stops the run."""
        return keep_lease(self.claims, claim, clock=self.clock, on_lost=on_lost)

    async def commit(
        self,
        claim: Claim,
        outcome: str,
        store: StateStore,
        build: Callable[[AgentState], AgentState],
    ) -> AgentState | None:
        """Finish ``claim`` and commit ``build(stored state)`` in one fenced transaction.

        Returns the state as written, or None when the lease was lost first: nothing was
        written. Raises ``StateError`` as the store's commit does.
        """
        written = await self.claims.finish_and_commit(claim, outcome, store, build)
        if written is None:
            self.metrics.lease_lost()
        return written

    async def finish(self, claim: Claim, outcome: str) -> None:
        """Finish a claimed fire that did not run (paused, circuit open, unreadable state)."""
        try:
            if not await self.claims.finish(claim, outcome):
                _log.warning("cluster.finish_fenced_out", agent=claim.agent, outcome=outcome)
        except StateError as exc:
            _log.warning("cluster.finish_failed", agent=claim.agent, error=str(exc))

    # -- background work ---------------------------------------------------------------------

    async def run(
        self,
        *,
        in_flight: Callable[[], int],
        on_abandoned: Callable[[Claim], Awaitable[None]],
        on_gone: Callable[[], None],
    ) -> None:
        """Heartbeat, check leases, report config drift and prune, until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats, in_flight, on_gone)
            tg.start_soon(self._lease_checks, on_abandoned)
            tg.start_soon(self._pruning)

    async def _heartbeats(self, in_flight: Callable[[], int], on_gone: Callable[[], None]) -> None:
        while True:
            await self.clock.sleep(self.config.heartbeat_interval)
            try:
                alive = True  # unless the database says otherwise in time
                with uninterrupted():
                    alive = await self.registry.heartbeat(in_flight())
                if not alive:
                    _log.error(
                        "cluster.node_name_taken",
                        node=self.node,
                        error="another process registered this node's name (this one was "
                        "presumed dead): stopping so that the two do not fence each other",
                    )
                    self.metrics.error("heartbeat")
                    on_gone()
                    return
                with uninterrupted():
                    await self.refresh_nodes()
            except StateError as exc:
                self.metrics.error("heartbeat")
                _log.warning("cluster.heartbeat_failed", node=self.node, error=str(exc))

    async def refresh_nodes(self) -> None:
        """Read the live nodes; log when the set of nodes with another config changes."""
        live = await self.registry.live_nodes(self.config.node_ttl)
        mine = self.registry.config_hash
        mismatched = [n for n in live if n.config_hash != mine]
        before = {(n.node, n.config_hash) for n in self.mismatched}
        after = {(n.node, n.config_hash) for n in mismatched}
        if after - before:
            _log.error(
                "cluster.config_mismatch",
                node=self.node,
                config_hash=mine,
                others=[
                    {"node": n.node, "config_hash": n.config_hash, "version": n.version}
                    for n in mismatched
                ],
                hint="every node must run the same config file: the fleet is not merged",
            )
        elif before and not after:
            _log.info("cluster.config_agrees", node=self.node, nodes=len(live))
        self.live, self.mismatched = live, mismatched
        self.metrics.nodes(len(live), len(mismatched))

    async def _lease_checks(self, on_abandoned: Callable[[Claim], Awaitable[None]]) -> None:
        while True:
            await self.clock.sleep(self.config.check_interval)
            try:
                found: list[Claim] = []
                with uninterrupted():
                    found = await self.claims.expired(self.node)
            except StateError as exc:
                self.metrics.error("check")
                _log.warning("cluster.check_failed", node=self.node, error=str(exc))
                continue
            for claim in found:
                self.metrics.abandoned()
                overdue = (self.clock.now() - claim.lease_until).total_seconds()
                _log.warning(
                    "cluster.claim_abandoned",
                    agent=claim.agent,
                    planned_at=claim.planned_at.isoformat(),
                    abandoned_node=claim.abandoned_node,
                    run_id=claim.run_id,
                    attempt=claim.attempt,
                    lease_expired_s_ago=round(overdue, 3),
                )
                await on_abandoned(claim)
            if self.ledger is not None and hasattr(self.ledger, "reap_orphans"):
                try:
                    with uninterrupted():
                        await self.ledger.reap_orphans()
                except StateError as exc:
                    _log.warning("cluster.reap_failed", node=self.node, error=str(exc))

    async def _pruning(self) -> None:
        while True:
            await self.clock.sleep(_PRUNE_EVERY)
            with contextlib.suppress(StateError):
                pruned = 0
                with uninterrupted():
                    pruned = await self.claims.prune(self.config.keep_claims)
                if pruned:
                    _log.info("cluster.claims_pruned", count=pruned)
            if self.budget is not None and hasattr(self.budget, "prune"):
                with contextlib.suppress(StateError):
                    with uninterrupted():
                        await self.budget.prune()

    # -- status ------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """This node, the live nodes and the latest claim of every agent (for ``status``)."""
        latest: dict[str, Claim] = {}
        nodes: list[NodeInfo] = self.live
        error = None
        try:
            nodes = await self.registry.live_nodes(self.config.node_ttl)
            latest = await self.claims.latest()
        except StateError as exc:
            error = str(exc)
        mine = self.registry.config_hash
        return {
            "node": self.node,
            "config_hash": mine,
            "nodes": [
                {
                    "node": n.node,
                    "version": n.version,
                    "config_hash": n.config_hash,
                    "config_matches": n.config_hash == mine,
                    "runs_in_flight": n.runs_in_flight,
                    "last_seen_s_ago": round(n.age_s, 1),
                    "started_at": n.started_at.isoformat(timespec="seconds"),
                }
                for n in nodes
            ],
            "latest": {
                agent: {
                    "node": c.node,
                    "status": c.status.value,
                    "planned_at": c.planned_at.isoformat(timespec="seconds"),
                    "outcome": c.outcome,
                }
                for agent, c in latest.items()
            },
            "error": error,
        }


def uninterrupted() -> anyio.CancelScope:
    """A database call of the background work is not cut off by the daemon's stop (which
    would break its connection mid-query), but waits no longer than a few seconds."""
    return anyio.move_on_after(5, shield=True)
