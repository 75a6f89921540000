"""In-memory ``FireClaims`` and ``NodeRegistry``: the test doubles of the cluster seams.

They follow the PostgreSQL rules exactly (one row per fire, one running claim per agent
slot, fenced writes, tokens that grow with every claim and takeover) with an injected clock
standing in for the database's: a ``FakeClock`` makes leases expire without waiting. Several
"nodes" share one ``MemoryCluster``, as they would share one database.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel

from supervisor.clock import Clock
from supervisor.cluster.base import Claim, ClaimStatus, NodeInfo, NodeNameInUse
from supervisor.errors import StateError
from supervisor.state.base import AgentState

__all__ = ["MemoryCluster", "MemoryFireClaims", "MemoryNodeRegistry"]

_SKIPPED = "skipped_overlap"


@dataclass
class MemoryCluster:
    """What the nodes of one test cluster share: the claims, the heartbeats, the clock."""

    clock: Clock
    claims: dict[tuple[str, datetime], Claim] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    tokens: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: the row lock of a fenced commit: its read, build and write are not interleaved
    commit_lock: anyio.Lock = field(default_factory=anyio.Lock)


class MemoryFireClaims:
    """``FireClaims`` over a ``MemoryCluster``."""

    def __init__(self, cluster: MemoryCluster) -> None:
        self.cluster = cluster

    async def claim(
        self,
        agent: str,
        planned_at: datetime,
        node: str,
        lease_s: float,
        *,
        run_id: str | None = None,
        slots: int = 1,
    ) -> Claim | None:
        await anyio.lowlevel.checkpoint()
        if not lease_s > 0 or slots < 1 or planned_at.tzinfo is None:
            raise ValueError("lease_s > 0, slots >= 1 and an aware planned_at are required")
        key = (agent, planned_at)
        if key in self.cluster.claims:
            return None
        now = self._now()
        busy = {c.slot for c in self._running() if c.agent == agent}
        free = [s for s in range(slots) if s not in busy]
        base = Claim(
            agent, planned_at, node, next(self.cluster.tokens), now, lease_s,
            ClaimStatus.SKIPPED, now, run_id=run_id,
        )  # fmt: skip
        if free:
            made = replace(
                base,
                status=ClaimStatus.RUNNING,
                slot=free[0],
                lease_until=now + timedelta(seconds=lease_s),
            )
        else:
            made = replace(base, outcome=_SKIPPED, finished_at=now, run_id=None)
        self.cluster.claims[key] = made
        return made

    async def renew(self, claim: Claim) -> bool:
        current = await self._fenced(claim)
        if current is None:
            return False
        self._put(replace(current, lease_until=self._now() + timedelta(seconds=current.lease_s)))
        return True

    async def finish(self, claim: Claim, outcome: str) -> bool:
        current = await self._fenced(claim)
        if current is None:
            return False
        self._put(
            replace(current, status=ClaimStatus.DONE, outcome=outcome, finished_at=self._now())
        )
        return True

    async def check_fence(self, claim: Claim) -> bool:
        return await self._fenced(claim) is not None

    async def finish_and_commit(
        self,
        claim: Claim,
        outcome: str,
        store: Any,
        state: AgentState | Callable[[AgentState], AgentState],
    ) -> AgentState | None:
        async with self.cluster.commit_lock:
            return await self._finish_and_commit(claim, outcome, store, state)

    async def _finish_and_commit(
        self,
        claim: Claim,
        outcome: str,
        store: Any,
        state: AgentState | Callable[[AgentState], AgentState],
    ) -> AgentState | None:
        current = await self._fenced(claim)
        if current is None:
            return None
        if callable(state):
            state = state(await store.load(claim.agent))
        try:
            await store.commit(state)
        except StateError:
            # As in PostgreSQL when the state itself is refused: the run is over all the
            # same, so is its claim.
            self._put(
                replace(current, status=ClaimStatus.DONE, outcome=outcome, finished_at=self._now())
            )
            raise
        self._put(
            replace(current, status=ClaimStatus.DONE, outcome=outcome, finished_at=self._now())
        )
        return state

    async def latest(self) -> dict[str, Claim]:
        await anyio.lowlevel.checkpoint()
        out: dict[str, Claim] = {}
        for claim in sorted(self.cluster.claims.values(), key=lambda c: c.planned_at):
            out[claim.agent] = claim
        return out

    async def prune(self, older_than_s: float) -> int:
        await anyio.lowlevel.checkpoint()
        cut = self._now() - timedelta(seconds=older_than_s)
        old = [
            k
            for k, c in self.cluster.claims.items()
            if c.status is not ClaimStatus.RUNNING and c.planned_at < cut
        ]
        for key in old:
            del self.cluster.claims[key]
        return len(old)

    async def expired(self, checker: str, *, limit: int = 100) -> list[Claim]:
        await anyio.lowlevel.checkpoint()
        now = self._now()
        late = sorted(
            (c for c in self._running() if c.lease_until < now), key=lambda c: c.lease_until
        )[:limit]
        out = []
        for claim in late:
            out.append(
                replace(
                    claim,
                    status=ClaimStatus.ABANDONED,
                    abandoned_node=claim.node,
                    abandoned_by=checker,
                    finished_at=now,
                    outcome="abandoned",
                )
            )
            self._put(out[-1])
        return out

    async def takeover(
        self, claim: Claim, node: str, lease_s: float, *, run_id: str | None = None
    ) -> Claim | None:
        await anyio.lowlevel.checkpoint()
        current = self.cluster.claims.get((claim.agent, claim.planned_at))
        if (
            current is None
            or current.fencing_token != claim.fencing_token
            or current.status is not ClaimStatus.ABANDONED
            or any(c.agent == claim.agent and c.slot == current.slot for c in self._running())
        ):
            return None
        now = self._now()
        taken = replace(
            current,
            status=ClaimStatus.RUNNING,
            node=node,
            fencing_token=next(self.cluster.tokens),
            lease_until=now + timedelta(seconds=lease_s),
            lease_s=lease_s,
            claimed_at=now,
            finished_at=None,
            outcome=None,
            run_id=run_id,
            attempt=current.attempt + 1,
        )
        self._put(taken)
        return taken

    async def get(self, agent: str, planned_at: datetime) -> Claim | None:
        await anyio.lowlevel.checkpoint()
        return self.cluster.claims.get((agent, planned_at))

    def _now(self) -> datetime:
        return self.cluster.clock.now()

    def _running(self) -> list[Claim]:
        return [c for c in self.cluster.claims.values() if c.status is ClaimStatus.RUNNING]

    def _put(self, claim: Claim) -> None:
        self.cluster.claims[(claim.agent, claim.planned_at)] = claim

    async def _fenced(self, claim: Claim) -> Claim | None:
        await anyio.lowlevel.checkpoint()
        current = self.cluster.claims.get((claim.agent, claim.planned_at))
        if (
            current is None
            or current.fencing_token != claim.fencing_token
            or current.status is not ClaimStatus.RUNNING
            or current.lease_until <= self._now()
        ):
            return None
        return current


class MemoryNodeRegistry:
    """``NodeRegistry`` over a ``MemoryCluster``."""

    def __init__(
        self,
        cluster: MemoryCluster,
        node: str,
        *,
        config_hash: str,
        version: str = "test",
        incarnation: str | None = None,
        max_age_s: float = 30.0,
    ) -> None:
        self.cluster = cluster
        self.node = node
        self.config_hash = config_hash
        self.version = version
        self.incarnation = incarnation or f"{node}:{id(self):x}"
        self.max_age_s = max_age_s

    async def register(self) -> None:
        await anyio.lowlevel.checkpoint()
        now = self.cluster.clock.now()
        old = self.cluster.nodes.get(self.node)
        if old is not None and old.incarnation != self.incarnation:
            age = (now - old.last_seen).total_seconds()
            if age < self.max_age_s:
                raise NodeNameInUse(self.node, old.incarnation, age)
        self.cluster.nodes[self.node] = NodeInfo(
            self.node, self.incarnation, now, now, self.config_hash, self.version, 0, 0.0
        )

    async def heartbeat(self, runs_in_flight: int) -> bool:
        await anyio.lowlevel.checkpoint()
        old = self.cluster.nodes.get(self.node)
        if old is None or old.incarnation != self.incarnation:
            return False
        self.cluster.nodes[self.node] = replace(
            old,
            last_seen=self.cluster.clock.now(),
            runs_in_flight=runs_in_flight,
            config_hash=self.config_hash,
        )
        return True

    async def deregister(self) -> None:
        await anyio.lowlevel.checkpoint()
        old = self.cluster.nodes.get(self.node)
        if old is not None and old.incarnation == self.incarnation:
            del self.cluster.nodes[self.node]

    async def live_nodes(self, max_age_s: float | None = None) -> list[NodeInfo]:
        await anyio.lowlevel.checkpoint()
        limit = self.max_age_s if max_age_s is None else max_age_s
        now = self.cluster.clock.now()
        live = []
        for name in sorted(self.cluster.nodes):
            info = self.cluster.nodes[name]
            age = max(0.0, (now - info.last_seen).total_seconds())
            if age < limit:
                live.append(replace(info, age_s=age))
        return live

    async def config_mismatches(self, max_age_s: float | None = None) -> list[NodeInfo]:
        return [n for n in await self.live_nodes(max_age_s) if n.config_hash != self.config_hash]
