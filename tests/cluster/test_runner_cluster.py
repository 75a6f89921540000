"""The runner in cluster mode: every fire claimed first, every commit fenced.

Two or three ``Runner`` "nodes" share one ``MemoryCluster`` (the database's claims) and one
``MemoryStore`` (the database's agent state), as daemons share one PostgreSQL. The database
has a clock of its own (leases are database time) and every node has its own ``NodeClock``,
so a test can let the database's time run on while a node stands still (a paused process).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from supervisor import Outcome, RunContext
from supervisor.cluster.base import Claim, ClaimStatus
from supervisor.cluster.memory import MemoryCluster, MemoryFireClaims, MemoryNodeRegistry
from supervisor.cluster.metrics import ClusterMetrics
from supervisor.cluster.node import ClusterNode
from supervisor.config import ClusterConfig
from supervisor.errors import StateError
from supervisor.guards.breaker import CircuitBreaker
from supervisor.guards.loops import LoopPolicy
from supervisor.metrics import Metrics
from supervisor.outcome import RunRecord
from supervisor.runner import AgentSlot, Runner
from supervisor.state.memory import MemoryStore
from supervisor.testing import FakeClock
from tests.test_runner import make_spec

T0 = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
LEASE = 30.0
AGENT = "alpha"
P = "agent_supervisor_"
# No claim delay: it is a real sleep, and the race it biases is not under test here.
CONFIG = ClusterConfig(lease=LEASE, claim_delay_per_run=0.0)

AgentFn = Callable[[RunContext], Awaitable[Any]]


class NodeClock:
    """A node's clock: it moves only when the test moves it, and a sleeper wakes once it has
    moved past the sleeper's deadline.

    Not ``FakeClock``, whose ``sleep`` jumps the clock at once: a lease renewer sleeping on
    it would spin, renewing for ever and dragging time along, and a node could never stand
    still (paused) while the database's time runs on.
    """

    def __init__(self, start: datetime) -> None:
        self._start = start
        self._offset = 0.0
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        return 1000.0 + self._offset

    def advance(self, seconds: float) -> None:
        """Move time forward; wake every sleeper now due (they run at the next checkpoint)."""
        self._offset += seconds
        for due, woken in self._sleepers:
            if due <= self._offset:
                woken.set()
        self._sleepers = [s for s in self._sleepers if s[0] > self._offset]

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await anyio.lowlevel.checkpoint()
            return
        entry = (self._offset + delay, anyio.Event())
        self._sleepers.append(entry)
        try:
            await entry[1].wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)


class Node:
    """One daemon of the cluster: its clock, its metrics registry, its ``ClusterNode`` and
    ``Runner``, on the shared database."""

    def __init__(
        self,
        name: str,
        db: MemoryCluster,
        store: MemoryStore,
        claims: MemoryFireClaims | None = None,
    ) -> None:
        self.name = name
        self.clock = NodeClock(db.clock.now())
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.claims = claims or MemoryFireClaims(db)
        self.cluster = ClusterNode(
            CONFIG,
            node=name,
            claims=self.claims,
            registry=MemoryNodeRegistry(db, name, config_hash="same"),
            metrics=ClusterMetrics(self.metrics),
            clock=self.clock,
        )
        self.runner = Runner(
            store=store,
            metrics=self.metrics,
            clock=self.clock,
            rng=random.Random(0),
            cluster=self.cluster,
        )

    def __repr__(self) -> str:
        return f"Node({self.name!r})"

    def slot(self, fn: AgentFn, **spec: Any) -> AgentSlot:
        """This node's slot of the agent ``alpha``, running ``fn``."""
        s = make_spec(fn, name=AGENT, loops=LoopPolicy.disabled(), **spec)
        g = s.guards
        return AgentSlot(s, CircuitBreaker(g.circuit_failures, g.circuit_cooldown, self.clock))

    def sample(self, name: str, **labels: str) -> float:
        """A sample of this node's registry (0 when it has none)."""
        return self.registry.get_sample_value(P + name, labels) or 0.0

    def claims_total(self, result: str) -> float:
        return self.sample("cluster_claims_total", result=result)

    def runs_total(self, outcome: str) -> float:
        return self.sample("runs_total", agent=AGENT, outcome=outcome)


class World:
    """The database (claims, agent state, its clock) and the nodes sharing it."""

    def __init__(self, names: str = "abc") -> None:
        self.clock = FakeClock(T0)
        self.db = MemoryCluster(self.clock)
        self.store = MemoryStore()
        self.nodes = [Node(name, self.db, self.store) for name in names]

    def advance(self, seconds: float, *, frozen: tuple[Node, ...] = ()) -> None:
        """Time passes, for the database and every node but the ``frozen`` ones."""
        self.clock.advance(seconds)
        for node in self.nodes:
            if node not in frozen:
                node.clock.advance(seconds)

    def claim(self, planned_at: datetime) -> Claim:
        """The database's row for the fire of ``alpha`` planned at ``planned_at``."""
        return self.db.claims[(AGENT, planned_at)]

    async def set_paused(self, paused: bool = True) -> None:
        """Pause the agent as another node's control API does: straight in the database."""
        state = await self.store.load(AGENT)
        await self.store.commit(state.model_copy(update={"paused": paused}))


class Gate:
    """Holds a run inside the agent until released."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.released = anyio.Event()
        #: True once a run went past the gate (it was not stopped while held)
        self.passed = False

    async def hold(self) -> None:
        self.entered.set()
        await self.released.wait()
        self.passed = True


@pytest.fixture
def world() -> World:
    return World()


def start(
    tg: TaskGroup,
    node: Node,
    slot: AgentSlot,
    planned_at: datetime | None,
    trigger: str = "schedule",
    *,
    abandoned: Claim | None = None,
) -> list[RunRecord | None]:
    """Start a fire on ``node`` in ``tg``; the list gets its record when it is done."""
    out: list[RunRecord | None] = []

    async def go() -> None:
        out.append(await node.runner.fire(slot, planned_at, trigger, abandoned=abandoned))

    tg.start_soon(go)
    return out


def counting(ran: list[str], node: str) -> AgentFn:
    """An agent that counts its runs in its state and notes which node ran it."""

    async def agent(ctx: RunContext) -> None:
        ran.append(node)
        ctx.state["runs"] = ctx.state.get("runs", 0) + 1
        ctx.state["by"] = node

    return agent


# -- one fire, several nodes ----------------------------------------------------------------


async def test_one_fire_seen_by_three_nodes_runs_once(world: World) -> None:
    """The same planned fire on three nodes at once: one runs it, the two others record
    skipped_claimed_elsewhere; the state holds one run; the claim counters add up."""
    ran: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            outs = {n.name: start(tg, n, n.slot(counting(ran, n.name)), T0) for n in world.nodes}
    records = {name: out[0] for name, out in outs.items()}
    assert all(r is not None for r in records.values())
    outcomes = Counter(r.outcome for r in records.values() if r is not None)
    assert outcomes == {Outcome.SUCCESS: 1, Outcome.SKIPPED_CLAIMED_ELSEWHERE: 2}
    (winner,) = [n for n, r in records.items() if r is not None and r.outcome is Outcome.SUCCESS]
    assert ran == [winner]

    won = records[winner]
    assert won is not None
    claim = world.claim(T0)
    assert (claim.node, claim.status, claim.outcome) == (winner, ClaimStatus.DONE, "success")
    assert claim.run_id == won.run_id and claim.attempt == 1
    state = await world.store.load(AGENT)
    assert state.data == {"runs": 1, "by": winner}
    assert state.totals == {"success": 1}
    assert state.last_run is not None and state.last_run.run_id == won.run_id
    assert state.last_planned_fire == T0

    for node in world.nodes:
        mine = node.name == winner
        assert node.claims_total("won") == (1 if mine else 0)
        assert node.claims_total("elsewhere") == (0 if mine else 1)
        assert node.claims_total("overlap") == node.claims_total("failed") == 0
        assert node.runs_total("success") == (1 if mine else 0)
        assert node.runs_total("skipped_claimed_elsewhere") == (0 if mine else 1)
    assert sum(n.claims_total("won") for n in world.nodes) == 1
    assert sum(n.claims_total("elsewhere") for n in world.nodes) == 2


async def test_a_fire_already_run_is_claimed_elsewhere_by_a_late_node(world: World) -> None:
    """A node that sees a fire after another node ran it (late tick, slow clock) does not run
    it again: the finished claim still holds the fire."""
    a, b, _ = world.nodes
    ran: list[str] = []
    first = await a.runner.fire(a.slot(counting(ran, "a")), T0)
    late = await b.runner.fire(b.slot(counting(ran, "b")), T0)
    assert first is not None and first.outcome is Outcome.SUCCESS
    assert late is not None and late.outcome is Outcome.SKIPPED_CLAIMED_ELSEWHERE
    assert (late.run_id, late.steps, late.attempts) == ("", 0, 0)
    assert ran == ["a"]
    assert (await world.store.load(AGENT)).totals == {"success": 1}


async def test_a_run_in_progress_on_one_node_makes_another_fire_an_overlap(world: World) -> None:
    """max_concurrent=1 and a run going on on node a: a different planned fire on node b is
    skipped_overlap (the agent's one run slot is cluster-wide), and stays decided."""
    a, b, c = world.nodes
    gate = Gate()
    ran: list[str] = []

    async def held(ctx: RunContext) -> None:
        await gate.hold()

    later = T0 + timedelta(minutes=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = start(tg, a, a.slot(held), T0)
            await gate.entered.wait()
            second = await b.runner.fire(b.slot(counting(ran, "b")), later)
            gate.released.set()
    assert second is not None and second.outcome is Outcome.SKIPPED_OVERLAP
    assert first[0] is not None and first[0].outcome is Outcome.SUCCESS
    assert ran == []
    skipped = world.claim(later)
    assert (skipped.status, skipped.outcome, skipped.node) == (
        ClaimStatus.SKIPPED,
        "skipped_overlap",
        "b",
    )
    assert b.claims_total("overlap") == 1 and b.claims_total("won") == 0
    assert b.runs_total("skipped_overlap") == 1
    # The skipped fire is decided: a third node seeing it now does not run it either.
    third = await c.runner.fire(c.slot(counting(ran, "c")), later)
    assert third is not None and third.outcome is Outcome.SKIPPED_CLAIMED_ELSEWHERE
    assert ran == []


async def test_max_concurrent_two_lets_two_nodes_run_the_agent_at_once(world: World) -> None:
    """With max_concurrent=2 a second fire on another node takes the second run slot while
    the first run goes on."""
    a, b, _ = world.nodes
    gate_a, gate_b = Gate(), Gate()

    async def held_a(ctx: RunContext) -> None:
        await gate_a.hold()

    async def held_b(ctx: RunContext) -> None:
        await gate_b.hold()

    later = T0 + timedelta(minutes=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = start(tg, a, a.slot(held_a, max_concurrent=2), T0)
            await gate_a.entered.wait()
            second = start(tg, b, b.slot(held_b, max_concurrent=2), later)
            await gate_b.entered.wait()
            assert {world.claim(T0).slot, world.claim(later).slot} == {0, 1}
            gate_a.released.set()
            gate_b.released.set()
    assert [r.outcome for r in (*first, *second) if r is not None] == [Outcome.SUCCESS] * 2


async def test_two_concurrent_runs_on_two_nodes_both_count_in_totals(world: World) -> None:
    """Two runs of one agent (max_concurrent=2) on two nodes at once, both successful: the
    committed totals count both, as they do on a single node."""
    a, b, _ = world.nodes
    gate_a, gate_b = Gate(), Gate()

    async def held_a(ctx: RunContext) -> None:
        await gate_a.hold()

    async def held_b(ctx: RunContext) -> None:
        await gate_b.hold()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            start(tg, a, a.slot(held_a, max_concurrent=2), T0)
            await gate_a.entered.wait()
            start(tg, b, b.slot(held_b, max_concurrent=2), T0 + timedelta(minutes=1))
            await gate_b.entered.wait()
            gate_a.released.set()
            gate_b.released.set()
    assert (await world.store.load(AGENT)).totals == {"success": 2}


# -- decided from the state read fresh after the claim ---------------------------------------


async def test_an_agent_paused_by_another_node_is_skipped_by_the_claimant(world: World) -> None:
    """Node a's copy of the state is unpaused, but another node paused the agent in the
    database: the claimant reads the state fresh, records skipped_paused and finishes the
    claim with that outcome."""
    a, _, _ = world.nodes
    ran: list[str] = []
    slot = a.slot(counting(ran, "a"))
    first = await a.runner.fire(slot, T0)
    assert first is not None and first.outcome is Outcome.SUCCESS
    assert slot.state is not None and not slot.state.paused

    await world.set_paused()
    later = T0 + timedelta(minutes=1)
    world.advance(60)
    record = await a.runner.fire(slot, later)
    assert record is not None and record.outcome is Outcome.SKIPPED_PAUSED
    assert ran == ["a"]
    claim = world.claim(later)
    assert (claim.node, claim.status, claim.outcome) == ("a", ClaimStatus.DONE, "skipped_paused")
    assert a.claims_total("won") == 2  # the claim was won; the fresh state said no
    assert a.runs_total("skipped_paused") == 1
    assert slot.state.paused  # the node's copy is the fresh one now
    assert (await world.store.load(AGENT)).totals == {"success": 1}


async def test_a_circuit_opened_on_another_node_skips_the_claimant(world: World) -> None:
    """Node b's failure opens the circuit (it is in the stored state); node a, whose own
    breaker is closed, restores the stored one: skipped_circuit_open, claim finished so."""
    a, b, _ = world.nodes

    async def fails(ctx: RunContext) -> None:
        raise ValueError("boom")

    ran: list[str] = []
    failed = await b.runner.fire(b.slot(fails, circuit_failures=1), T0)
    assert failed is not None and failed.outcome is Outcome.FAILURE
    slot = a.slot(counting(ran, "a"), circuit_failures=1)
    assert slot.breaker.allow() and slot.breaker.state.code == 0

    later = T0 + timedelta(seconds=30)
    world.advance(30)  # within the 60 s cooldown
    record = await a.runner.fire(slot, later)
    assert record is not None and record.outcome is Outcome.SKIPPED_CIRCUIT_OPEN
    assert ran == []
    claim = world.claim(later)
    assert (claim.status, claim.outcome) == (ClaimStatus.DONE, "skipped_circuit_open")
    assert a.runs_total("skipped_circuit_open") == 1


async def test_unreadable_state_blocks_the_fire_and_finishes_its_claim(world: World) -> None:
    """A corrupt state in the database: no run, the slot is blocked, the claim is finished
    (outcome blocked) rather than left to expire and be taken over into the same error."""
    a, _, _ = world.nodes
    ran: list[str] = []
    world.store.corrupt(AGENT)
    slot = a.slot(counting(ran, "a"))
    assert await a.runner.fire(slot, T0) is None
    assert ran == [] and slot.blocked is not None
    claim = world.claim(T0)
    assert (claim.status, claim.outcome) == (ClaimStatus.DONE, "blocked")
    assert a.sample("state_errors_total", agent=AGENT, op="load") == 1


class Unreachable(MemoryFireClaims):
    """Claims on a database that cannot be reached."""

    async def claim(self, *args: Any, **kwargs: Any) -> Claim | None:
        await anyio.lowlevel.checkpoint()
        raise StateError("*", "connection refused")


async def test_a_claim_the_database_cannot_answer_runs_nothing(world: World) -> None:
    """The claim fails (database unreachable): no run, no record, claims_total{failed}."""
    node = Node("d", world.db, world.store, claims=Unreachable(world.db))
    ran: list[str] = []
    with capture_logs() as logs:
        assert await node.runner.fire(node.slot(counting(ran, "d")), T0) is None
    assert ran == [] and world.db.claims == {}
    assert node.claims_total("failed") == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["cluster.claim_failed"]
    assert node.runner.in_flight == 0


# -- leases ---------------------------------------------------------------------------------


async def test_a_run_whose_lease_runs_out_stops_and_the_takeover_commits(world: World) -> None:
    """Node a's lease runs out mid-run (its renewal comes too late) and node b takes the fire
    over: a's run is stopped with lease_lost and commits nothing; b's commit is the state."""
    a, b, _ = world.nodes
    gate = Gate()

    async def stale(ctx: RunContext) -> None:
        ctx.state["by"] = "a"
        await gate.hold()

    ran: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = start(tg, a, a.slot(stale), T0)
            await gate.entered.wait()
            world.advance(LEASE + 1)  # a's renewer wakes only now: too late
            (abandoned,) = await b.claims.expired("b")
            assert (abandoned.abandoned_node, abandoned.abandoned_by) == ("a", "b")
            taken = await b.runner.fire(
                b.slot(counting(ran, "b")), T0, "takeover", abandoned=abandoned
            )
    (lost,) = first
    assert lost is not None and lost.outcome is Outcome.LEASE_LOST
    assert lost.error_type == "LeaseLost"
    assert lost.extra == {"state_committed": False, "run_outcome": "lease_lost"}
    assert not gate.passed  # stopped while held, not finished
    assert taken is not None and taken.outcome is Outcome.SUCCESS and taken.trigger == "takeover"
    assert ran == ["b"]

    state = await world.store.load(AGENT)
    assert state.data == {"runs": 1, "by": "b"}
    assert state.totals == {"success": 1}
    assert state.last_run is not None and state.last_run.run_id == taken.run_id
    claim = world.claim(T0)
    assert (claim.node, claim.attempt, claim.status, claim.outcome) == (
        "b",
        2,
        ClaimStatus.DONE,
        "success",
    )
    assert a.sample("cluster_lease_lost_total") == 1
    assert a.runs_total("lease_lost") == 1
    assert b.sample("cluster_takeovers_total") == 1
    assert a.runner.in_flight == b.runner.in_flight == 0


@pytest.mark.parametrize("taken_over", [False, True], ids=["lease_ran_out", "taken_over"])
async def test_a_run_that_outlived_its_lease_unnoticed_is_fenced_out(
    world: World, taken_over: bool
) -> None:
    """Node a stands still (paused) past its lease, so its renewer never notices; its run
    then ends normally, but the fenced commit refuses it: lease_lost, state_committed False,
    nothing written, run.fenced_out logged. A takeover's commit meanwhile stands."""
    a, b, _ = world.nodes
    gate = Gate()

    async def stale(ctx: RunContext) -> str:
        ctx.state["by"] = "a"
        await gate.hold()
        return "stale result"

    ran: list[str] = []
    with anyio.fail_after(5), capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            first = start(tg, a, a.slot(stale), T0)
            await gate.entered.wait()
            held = world.claim(T0)
            world.advance(LEASE + 1, frozen=(a,))
            if taken_over:
                (abandoned,) = await b.claims.expired("b")
                taken = await b.runner.fire(
                    b.slot(counting(ran, "b")), T0, "takeover", abandoned=abandoned
                )
                assert taken is not None and taken.outcome is Outcome.SUCCESS
            gate.released.set()
    (lost,) = first
    assert gate.passed  # the run itself went to its end
    assert lost is not None and lost.outcome is Outcome.LEASE_LOST
    assert lost.extra == {"state_committed": False, "run_outcome": "success"}
    assert lost.result == "stale result"
    fenced = [e for e in logs if e["event"] == "run.fenced_out"]
    assert len(fenced) == 1
    assert fenced[0]["fencing_token"] == held.fencing_token
    assert fenced[0]["run_outcome"] == "success"
    assert a.sample("cluster_lease_lost_total") == 1

    state = await world.store.load(AGENT)
    if taken_over:
        assert state.data == {"runs": 1, "by": "b"} and state.totals == {"success": 1}
        assert world.claim(T0).node == "b"
    else:
        assert state.data == {} and state.totals == {} and state.last_run is None
        # Nobody finished the claim: it is still running, for the lease check to find.
        assert world.claim(T0).status is ClaimStatus.RUNNING
        (abandoned,) = await b.claims.expired("b")
        assert abandoned.fencing_token == held.fencing_token


async def test_a_long_run_renews_its_lease_and_commits(world: World) -> None:
    """A run longer than its lease keeps it while its node renews (time passing for all):
    it commits normally."""
    a, _, _ = world.nodes
    gate = Gate()

    async def long(ctx: RunContext) -> None:
        await gate.hold()
        ctx.state["done"] = True

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = start(tg, a, a.slot(long), T0)
            await gate.entered.wait()
            for _ in range(9):  # 90 s, three leases, in steps of a third of one
                world.advance(LEASE / 3)
                for _ in range(5):  # let the renewer renew
                    await anyio.lowlevel.checkpoint()
            gate.released.set()
    (record,) = first
    assert record is not None and record.outcome is Outcome.SUCCESS
    assert (await world.store.load(AGENT)).data == {"done": True}
    claim = world.claim(T0)
    assert (claim.status, claim.outcome, claim.attempt) == (ClaimStatus.DONE, "success", 1)
    assert a.sample("cluster_lease_lost_total") == 0


# -- takeover -------------------------------------------------------------------------------


async def test_an_abandoned_fire_is_taken_over_and_run_by_one_node_only(world: World) -> None:
    """Node a claimed the fire and died. Node b finds the claim abandoned; b and c both try
    to take it over: one runs it as attempt 2 and commits, the other gets None, runs nothing."""
    a, b, c = world.nodes
    dead = await a.claims.claim(AGENT, T0, "a", LEASE, run_id="dead-run")
    assert dead is not None
    world.advance(LEASE + 1)
    (abandoned,) = await b.claims.expired("b")
    assert await c.claims.expired("c") == []

    ran: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            outs = {
                n.name: start(
                    tg, n, n.slot(counting(ran, n.name)), T0, "takeover", abandoned=abandoned
                )
                for n in (b, c)
            }
    records = {name: out[0] for name, out in outs.items()}
    (winner,) = [name for name, r in records.items() if r is not None]
    (loser,) = {"b", "c"} - {winner}
    won = records[winner]
    assert won is not None and won.outcome is Outcome.SUCCESS and won.trigger == "takeover"
    assert ran == [winner]

    claim = world.claim(T0)
    assert (claim.node, claim.attempt, claim.status, claim.outcome) == (
        winner,
        2,
        ClaimStatus.DONE,
        "success",
    )
    assert claim.run_id == won.run_id and claim.fencing_token > dead.fencing_token
    state = await world.store.load(AGENT)
    assert state.data == {"runs": 1, "by": winner}
    assert state.last_run is not None and state.last_run.run_id == won.run_id
    assert state.last_planned_fire == T0
    by_name = {n.name: n for n in world.nodes}
    assert by_name[winner].sample("cluster_takeovers_total") == 1
    assert by_name[loser].sample("cluster_takeovers_total") == 0
    assert by_name[loser].runs_total("success") == 0

    # The same abandoned claim handed over once more (a late checker): still nothing.
    again = await by_name[loser].runner.fire(
        by_name[loser].slot(counting(ran, loser)), T0, "takeover", abandoned=abandoned
    )
    assert again is None and ran == [winner]


# -- the pause flag is the database's --------------------------------------------------------


async def test_a_pause_set_on_another_node_during_a_run_survives_its_commit(world: World) -> None:
    """An operator pauses the agent through node b while node a runs it: a's commit writes
    its data but keeps the pause, and the next fire (on any node) is skipped_paused."""
    a, b, _ = world.nodes
    gate = Gate()

    async def held(ctx: RunContext) -> None:
        await gate.hold()
        ctx.state["runs"] = ctx.state.get("runs", 0) + 1

    slot = a.slot(held)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = start(tg, a, slot, T0)
            await gate.entered.wait()
            await world.set_paused()
            gate.released.set()
    (record,) = first
    assert record is not None and record.outcome is Outcome.SUCCESS
    state = await world.store.load(AGENT)
    assert state.paused
    assert state.data == {"runs": 1} and state.totals == {"success": 1}
    assert state.last_run is not None and state.last_run.run_id == record.run_id
    assert slot.state is not None and slot.state.paused  # the node keeps what was written

    ran: list[str] = []
    later = T0 + timedelta(minutes=1)
    world.advance(60)
    after = await b.runner.fire(b.slot(counting(ran, "b")), later)
    assert after is not None and after.outcome is Outcome.SKIPPED_PAUSED and ran == []


# -- manual triggers ------------------------------------------------------------------------


async def test_a_manual_trigger_claims_the_fire_at_the_node_clocks_now(world: World) -> None:
    """A manual trigger has no planned time: it is claimed as the fire planned at the node's
    own now (7 s ahead of the database here), and recorded without a planned time."""
    a, _, _ = world.nodes
    a.clock.advance(7)
    now = a.clock.now()
    assert now != world.clock.now()
    ran: list[str] = []
    record = await a.runner.fire(a.slot(counting(ran, "a")), None, "manual")
    assert record is not None and record.outcome is Outcome.SUCCESS
    assert (record.trigger, record.planned_at, record.lag_s) == ("manual", None, 0.0)
    assert set(world.db.claims) == {(AGENT, now)}
    claim = world.claim(now)
    assert (claim.node, claim.status, claim.outcome) == ("a", ClaimStatus.DONE, "success")
    assert claim.run_id == record.run_id
    state = await world.store.load(AGENT)
    assert state.last_planned_fire is None and state.data == {"runs": 1, "by": "a"}


async def test_a_manual_trigger_while_another_node_runs_the_agent_overlaps(world: World) -> None:
    """A manual trigger on node b while node a runs the agent: skipped_overlap, not run."""
    a, b, _ = world.nodes
    gate = Gate()

    async def held(ctx: RunContext) -> None:
        await gate.hold()

    ran: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = start(tg, a, a.slot(held), T0)
            await gate.entered.wait()
            world.advance(5)
            manual = await b.runner.fire(b.slot(counting(ran, "b")), None, "manual")
            gate.released.set()
    assert manual is not None and manual.outcome is Outcome.SKIPPED_OVERLAP
    assert manual.trigger == "manual" and ran == []
    assert first[0] is not None and first[0].outcome is Outcome.SUCCESS
