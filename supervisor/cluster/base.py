"""The cluster seams: fire claims with fenced leases, and node heartbeats.

Several daemons share one PostgreSQL. Every node schedules every agent; when a fire is due,
each node tries to claim it and exactly one wins (a unique row per ``(agent, planned_at)``)::

    (none) ──claim──> running ──finish (fenced)──> done
       │                │  ^
       │  lease expired │  │ takeover (policy rerun: new node, new fencing token, attempt+1)
       │                v  │
       │             abandoned          (policy next: stays abandoned; the next fire runs)
       └──every run slot of the agent busy──> skipped

At most ``slots`` (the agent's ``max_concurrent``, usually 1) claims of one agent are running
at a time across the cluster, enforced by a unique index: two nodes never run one agent at
once, whichever fires they hold.

The winner holds a lease (``lease_until``, database time) and renews it while the run goes
on. Every write that ends the run is fenced: it names the claim's ``fencing_token`` and
succeeds only while that claim is ``running`` with an unexpired lease, so a node that was
paused or cut off past its lease can no longer finish, renew or commit. The token grows with
every claim and every takeover, so a stale holder never matches the current one.

Node heartbeats (``nodes``) say who is alive, what each runs and whether their configs agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import orjson

from supervisor.errors import SupervisorError
from supervisor.state.base import AgentState

__all__ = [
    "Claim",
    "ClaimStatus",
    "FireClaims",
    "LeaseLost",
    "NodeInfo",
    "NodeNameInUse",
    "NodeRegistry",
    "TakeoverPolicy",
    "claim_delay",
    "config_hash",
]


class ClaimStatus(StrEnum):
    """Where one claimed fire is."""

    #: the owner runs it and renews the lease
    RUNNING = "running"
    #: the owner finished it before its lease expired; ``outcome`` says how it went
    DONE = "done"
    #: the lease expired first: the owner died, hung, was paused or cut off
    ABANDONED = "abandoned"
    #: every run slot of the agent was busy (a run of it is going on somewhere): not run,
    #: like ``skipped_overlap`` on a single node
    SKIPPED = "skipped"


class TakeoverPolicy(StrEnum):
    """What happens to a fire whose claim was abandoned (per agent, in config)."""

    #: the node that found the abandoned claim takes it over and runs the fire now
    RERUN = "rerun"
    #: nothing now: the agent's next fire runs as usual
    NEXT = "next"


@dataclass(frozen=True, slots=True)
class Claim:
    """One claimed fire, as the database holds it. Times are database time, UTC."""

    agent: str
    planned_at: datetime
    #: the node that holds (or held) it
    node: str
    #: grows with every claim and takeover; every fenced write names it
    fencing_token: int
    lease_until: datetime
    #: the lease length a renewal extends by, in seconds
    lease_s: float
    status: ClaimStatus
    claimed_at: datetime
    #: 1 for the first run of the fire, +1 per takeover
    attempt: int = 1
    #: the agent's run slot it holds (0 .. max_concurrent - 1)
    slot: int = 0
    run_id: str | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    #: the node whose lease expired, and the node that found it (last abandonment)
    abandoned_node: str | None = None
    abandoned_by: str | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node's latest heartbeat."""

    node: str
    #: tells two processes using one node name apart (host, pid, start time)
    incarnation: str
    started_at: datetime
    last_seen: datetime
    config_hash: str
    version: str
    runs_in_flight: int
    #: seconds since ``last_seen``, by the database clock
    age_s: float


class LeaseLost(SupervisorError):
    """The node lost a fire's lease mid-run: the run is stopped, its results not committed."""


class NodeNameInUse(SupervisorError):
    """Another live process already heartbeats under this node name."""

    def __init__(self, node: str, incarnation: str, age_s: float) -> None:
        self.node = node
        self.incarnation = incarnation
        self.age_s = age_s
        super().__init__(
            f"node name {node!r} is in use by {incarnation} (seen {age_s:.1f}s ago): "
            "give every node its own name"
        )


@runtime_checkable
class FireClaims(Protocol):
    """Claims on fires, decided by one database. Implementation: ``PgFireClaims``."""

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
        """Claim the fire; None when another node already holds (or held) it; a ``SKIPPED``
        claim when all ``slots`` of the agent are running other fires."""
        ...

    async def renew(self, claim: Claim) -> bool:
        """Extend the lease by ``lease_s``; False when the claim was lost (stop the run)."""
        ...

    async def finish(self, claim: Claim, outcome: str) -> bool:
        """Mark the claim done (fenced); False when the lease was lost first."""
        ...

    async def check_fence(self, claim: Claim) -> bool:
        """True while the claim is running with an unexpired lease."""
        ...

    async def finish_and_commit(
        self,
        claim: Claim,
        outcome: str,
        store: Any,
        state: AgentState | Callable[[AgentState], AgentState],
    ) -> AgentState | None:
        """Finish the claim and commit the agent's state together, fenced: None (and
        nothing written) when the lease was lost; else the state as written. ``state`` may
        be a function building the new state from the stored one."""
        ...

    async def expired(self, checker: str, *, limit: int = 100) -> list[Claim]:
        """Mark running claims past their lease ``abandoned``; return them (each to one
        checker only, however many look at once)."""
        ...

    async def latest(self) -> dict[str, Claim]:
        """The most recent claim of every agent."""
        ...

    async def prune(self, older_than_s: float) -> int:
        """Delete finished claims planned more than ``older_than_s`` seconds ago."""
        ...

    async def takeover(
        self, claim: Claim, node: str, lease_s: float, *, run_id: str | None = None
    ) -> Claim | None:
        """Claim an abandoned fire again for ``node`` (policy rerun); None when another
        node took it over first."""
        ...


@runtime_checkable
class NodeRegistry(Protocol):
    """Heartbeats of the nodes of one cluster. Implementation: ``PgNodeRegistry``."""

    node: str
    #: the fleet digest this node announces (a reload may change it)
    config_hash: str

    async def register(self) -> None:
        """Announce this node; raises ``NodeNameInUse`` when a live process has its name."""
        ...

    async def heartbeat(self, runs_in_flight: int) -> bool:
        """Refresh ``last_seen``; False when another process has taken over this name."""
        ...

    async def deregister(self) -> None:
        """Remove this node's row (clean shutdown)."""
        ...

    async def live_nodes(self, max_age_s: float) -> list[NodeInfo]:
        """Nodes seen within ``max_age_s`` seconds, by name."""
        ...

    async def config_mismatches(self, max_age_s: float) -> list[NodeInfo]:
        """Live nodes whose config hash differs from this node's."""
        ...


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable digest of a config document (keys sorted, JSON).

    Hash the validated config without what may differ per node by design (the node name,
    listen addresses, paths): two nodes with different digests run different fleets.
    """
    raw = orjson.dumps(config, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(raw).hexdigest()[:16]


def claim_delay(runs_in_flight: int, *, per_run: float = 0.02, cap: float = 0.5) -> float:
    """Seconds a node waits before claiming a fire: longer the busier it is.

    Every node sees a fire at about the same moment, so the first insert wins; a short wait
    per run in flight lets an idler node win, which spreads work without any coordination.
    """
    return min(cap, max(0, runs_in_flight) * per_run)
