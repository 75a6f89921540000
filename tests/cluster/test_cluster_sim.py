"""Three simulated nodes on one PostgreSQL run every fire once; a killed node's work is
taken over without repeating its effect.

``SimNode.handle`` is the fire path the daemon's runner follows in cluster mode, in small:
claim (after a delay that grows with the runs in flight), keep the lease while running,
load the agent's state fresh, do the effect through the shared ledger, then finish the claim
and commit the state in one fenced transaction. The daemon-level test with real processes
and SIGKILL belongs to the daemon; this one pins the library contract it builds on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from supervisor.cluster import Claim, TakeoverPolicy, claim_delay
from supervisor.cluster.claims import PgFireClaims
from supervisor.cluster.lease import keep_lease
from supervisor.cluster.nodes import PgNodeRegistry
from supervisor.effects import EffectStatus, InvalidTransition
from supervisor.effects.ledger.postgres import PostgresLedger
from supervisor.state.postgres import Database, PostgresStore
from supervisor.testing import FakeClock
from tests.cluster.conftest import NodeFactory
from tests.cluster.pg import execute

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
AGENTS = [f"agent-{i:02d}" for i in range(20)]
ROUNDS = 5
LEASE_S = 30.0


@dataclass
class World:
    """What the outside world saw: every effect that reached the target."""

    executed: Counter[tuple[str, datetime]] = field(default_factory=Counter)


class SimNode:
    """One daemon's cluster fire path, on a pool of its own."""

    def __init__(self, name: str, db: Database, world: World) -> None:
        self.name = name
        self.world = world
        self.claims = PgFireClaims(db)
        self.store = PostgresStore(db)
        self.ledger = PostgresLedger(db, node=name, clock=FakeClock(T0), node_ttl_s=30)
        self.nodes = PgNodeRegistry(db, name, config_hash="same", version="test")
        self.in_flight = 0
        self.skipped_claimed_elsewhere = 0
        self.won: list[Claim] = []
        self.outcomes = Counter[str]()
        #: when set, runs stop after the effect reached the target, before its result
        #: is recorded: the moment a SIGKILL hits
        self.freeze: anyio.Event | None = None
        self.frozen = 0

    async def start(self) -> None:
        await self.store.open()
        await self.ledger.open()
        await self.nodes.register()

    async def stop(self) -> None:
        await self.ledger.close()
        await self.store.close()

    async def handle(self, agent: str, planned_at: datetime) -> None:
        """A fire is due: claim it or count it as someone else's, then run it."""
        await anyio.sleep(claim_delay(self.in_flight, per_run=0.002))
        claim = await self.claims.claim(agent, planned_at, self.name, LEASE_S)
        if claim is None:
            self.skipped_claimed_elsewhere += 1
            return
        self.won.append(claim)
        await self.run(claim)

    async def run(self, claim: Claim) -> None:
        self.in_flight += 1
        try:
            async with keep_lease(self.claims, claim) as lease:
                state = await self.store.load(claim.agent)  # fresh: another node may have run
                outcome = await self.effect(claim)
                state.data["runs"] = state.data.get("runs", 0) + 1
                state.data.setdefault("by", []).append(self.name)
            if lease.lost:
                return  # the fire may run elsewhere now: commit nothing
            committed = await self.claims.finish_and_commit(claim, outcome, self.store, state)
            self.outcomes[outcome if committed else "fenced_out"] += 1
        finally:
            self.in_flight -= 1

    async def effect(self, claim: Claim) -> str:
        """Post once per fire, exactly as ``ctx.effect`` decides from the ledger."""
        key = claim.planned_at.isoformat()
        record = await self.ledger.get(claim.agent, "post", key)
        if record is not None and record.status is EffectStatus.DONE:
            return "success"  # duplicate prevented
        if record is not None:
            return "held_unknown"  # may have happened: never repeated blindly
        now = self.ledger.clock.now()
        try:
            await self.ledger.write_intent(
                claim.agent, "post", key, at=now, run_id=claim.run_id or "r", idempotency_key=key
            )
        except InvalidTransition:
            return "held_unknown"
        self.world.executed[(claim.agent, claim.planned_at)] += 1
        if self.freeze is not None:
            self.frozen += 1
            await self.freeze.wait()
        await self.ledger.write_result(claim.agent, "post", key, at=now, result=None, note=None)
        return "success"

    async def check_takeovers(self, policy: TakeoverPolicy) -> int:
        """The lease checker: abandon expired claims, mark dead nodes' intents unknown,
        and (policy rerun) run each abandoned fire again here."""
        abandoned = await self.claims.expired(self.name)
        await self.ledger.reap_orphans()
        for claim in abandoned:
            if policy is TakeoverPolicy.RERUN:
                taken = await self.claims.takeover(claim, self.name, LEASE_S)
                if taken is not None:
                    await self.run(taken)
        return len(abandoned)


def fires(rounds: range, agents: list[str]) -> list[tuple[str, datetime]]:
    """The planned fires: every agent every 2 s, identical on every node."""
    return [(a, T0 + timedelta(seconds=2 * k)) for k in rounds for a in agents]


async def race(nodes: list[SimNode], due: list[tuple[str, datetime]]) -> None:
    """Every node sees every fire at the same moment, as every node schedules every agent."""
    async with anyio.create_task_group() as tg:
        for agent, at in due:
            for node in nodes:
                tg.start_soon(node.handle, agent, at)


async def test_three_nodes_run_each_fire_once_and_survive_a_kill(
    connect: NodeFactory, schema: str
) -> None:
    """100 fires, 3 nodes, node c killed mid-run: every fire has one claim, finished once;
    no effect reached the target twice; c's cut-short fires were taken over (their effect
    held as unknown, not repeated); the survivors ran everything after."""
    world = World()
    a, b, c = [SimNode(n, await connect(), world) for n in "abc"]
    for node in (a, b, c):
        await node.start()
    try:
        with anyio.fail_after(120):
            # Round 0 of five agents goes to c alone, a and b race the rest of round 0;
            # c freezes after each effect, before its result: then it is killed.
            c.freeze = anyio.Event()
            killed = anyio.CancelScope()

            async def node_c() -> None:
                with killed:
                    await race([c], fires(range(1), AGENTS[:5]))

            async with anyio.create_task_group() as tg:
                tg.start_soon(node_c)
                with anyio.fail_after(30):
                    while c.frozen < 5:  # noqa: ASYNC110 - bounded, and the scenario's own gate
                        await anyio.sleep(0.01)
                await race([a, b], fires(range(1), AGENTS[5:]))
                killed.cancel()  # SIGKILL: c's claims stay "running", its intents open
            c_won = {(cl.agent, cl.planned_at) for cl in c.won}
            assert len(c_won) == 5

            # Time passes: c's leases run out and its heartbeat goes stale.
            execute(
                schema,
                "UPDATE {s}.fire_claims SET lease_until = now() - interval '1 s' WHERE node = 'c'",
            )
            execute(
                schema, "UPDATE {s}.nodes SET last_seen = now() - interval '1 min' WHERE node = 'c'"
            )
            found: list[int] = []

            async def check(node: SimNode) -> None:
                found.append(await node.check_takeovers(TakeoverPolicy.RERUN))

            async with anyio.create_task_group() as tg:
                for node in (a, b):  # both check; each abandoned claim goes to one of them
                    tg.start_soon(check, node)
            assert sum(found) == 5

            for k in range(1, ROUNDS):  # fires 2 s apart: one round after the other
                await race([a, b], fires(range(k, k + 1), AGENTS))
    finally:
        for node in (a, b, c):
            await node.stop()

    total = len(AGENTS) * ROUNDS
    rows = execute(schema, "SELECT status, attempt, node FROM {s}.fire_claims")
    assert len(rows) == total
    assert {status for status, _, _ in rows} == {"done"}
    taken_over = [node for _, attempt, node in rows if attempt == 2]
    assert len(taken_over) == 5 and set(taken_over) <= {"a", "b"}
    assert all(n == 1 for n in world.executed.values())
    assert len(world.executed) == total  # every fire's effect happened, exactly once
    assert a.outcomes["held_unknown"] + b.outcomes["held_unknown"] == 5
    # Every fire but c's five was seen by one other node, which skipped it.
    assert a.skipped_claimed_elsewhere + b.skipped_claimed_elsewhere == total - 5
    assert a.won and b.won  # the work was split
    runs = dict(execute(schema, "SELECT agent, (doc->'data'->>'runs')::int FROM {s}.agents"))
    assert runs == dict.fromkeys(AGENTS, ROUNDS)  # c's killed runs committed nothing
