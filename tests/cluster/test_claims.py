"""Fire claims on the real server: one winner per fire, fenced leases, takeover.

"Nodes" are separate connection pools on one schema. Leases are made to expire by moving
``lease_until`` into the past with SQL (the database clock decides, so this is the fake
clock of these tests); one test lets a short lease run out for real.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from supervisor.cluster import Claim, ClaimStatus, claim_delay, config_hash
from supervisor.cluster.claims import PgFireClaims
from supervisor.errors import StateCorruptError
from supervisor.state import AgentState
from supervisor.state.postgres import PostgresStore
from tests.cluster.conftest import NodeFactory
from tests.cluster.pg import execute

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


def expire(schema: str, claim: Claim, seconds_ago: float = 1.0) -> None:
    """Make ``claim``'s lease run out, as if its holder stopped renewing long ago."""
    execute(
        schema,
        "UPDATE {s}.fire_claims SET lease_until = now() - make_interval(secs => %s) "
        "WHERE fencing_token = %s",
        (seconds_ago, claim.fencing_token),
    )


async def test_exactly_one_of_three_nodes_wins_each_of_500_fires(
    connect: NodeFactory, schema: str
) -> None:
    """Three nodes race for the same 500 fires at once: every fire has exactly one claim,
    held by the one node that got a ``Claim`` back; the others got None."""
    nodes = {name: PgFireClaims(await connect()) for name in ("a", "b", "c")}
    fires = [T0 + timedelta(seconds=2 * i) for i in range(500)]
    won: dict[datetime, list[str]] = {at: [] for at in fires}
    lost = Counter[str]()

    async def race(name: str, claims: PgFireClaims, at: datetime) -> None:
        # One agent per fire: the race is for the fire, not for the agent's run slot.
        claim = await claims.claim(f"agent-{fires.index(at)}", at, name, 30.0)
        if claim is None:
            lost[name] += 1
        else:
            assert (claim.node, claim.status, claim.attempt) == (name, ClaimStatus.RUNNING, 1)
            won[at].append(name)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for at in fires:
                for name, claims in nodes.items():
                    tg.start_soon(race, name, claims, at)

    assert all(len(winners) == 1 for winners in won.values())
    assert sum(lost.values()) == 2 * 500
    stored = execute(
        schema,
        "SELECT node, count(*), count(DISTINCT fencing_token) FROM {s}.fire_claims GROUP BY node",
    )
    assert sum(n for _, n, _ in stored) == 500
    assert all(n == tokens for _, n, tokens in stored)
    by_node = Counter(w[0] for w in won.values())
    assert {node: count for node, count, _ in stored} == dict(by_node)


async def test_an_agent_runs_on_one_node_at_a_time(connect: NodeFactory, schema: str) -> None:
    """While one fire of an agent runs, a later fire of it is recorded ``skipped`` by the
    node that sees it first (None for the others); with two slots, two may run; once the
    run ends (or its lease is abandoned) the next fire can be claimed."""
    a, b = PgFireClaims(await connect()), PgFireClaims(await connect())
    first = await a.claim("alpha", T0, "a", 30.0)
    assert first is not None and first.slot == 0
    busy = await b.claim("alpha", T0 + timedelta(seconds=2), "b", 30.0)
    assert busy is not None and (busy.status, busy.outcome) == (
        ClaimStatus.SKIPPED,
        "skipped_overlap",
    )
    assert await a.claim("alpha", T0 + timedelta(seconds=2), "a", 30.0) is None
    assert not await b.renew(busy) and not await b.finish(busy, "success")
    second = await b.claim("alpha", T0 + timedelta(seconds=3), "b", 30.0, slots=2)
    assert second is not None and (second.status, second.slot) == (ClaimStatus.RUNNING, 1)
    assert await a.finish(first, "success")
    third = await b.claim("alpha", T0 + timedelta(seconds=4), "b", 30.0)
    assert third is not None and third.status is ClaimStatus.RUNNING
    expire(schema, third)
    (abandoned,) = await a.expired("a")
    fourth = await a.claim("alpha", T0 + timedelta(seconds=6), "a", 30.0)
    assert fourth is not None and fourth.status is ClaimStatus.RUNNING
    # The newer fire holds the slot now: the abandoned one cannot be taken over.
    assert await b.takeover(abandoned, "b", 30.0) is None


async def test_the_lease_is_database_time_and_renewal_extends_it(connect: NodeFactory) -> None:
    """``lease_until`` is the database's ``now()`` plus the lease; a renewal moves it on."""
    claims = PgFireClaims(await connect())
    claim = await claims.claim("alpha", T0, "a", 5.0, run_id="run-1")
    assert claim is not None and claim.run_id == "run-1"
    assert timedelta(seconds=4) < claim.lease_until - claim.claimed_at <= timedelta(seconds=5)
    assert await claims.renew(claim)
    renewed = await claims.get("alpha", T0)
    assert renewed is not None and renewed.lease_until > claim.lease_until
    assert await claims.check_fence(claim)


async def test_an_expired_lease_is_abandoned_exactly_once(
    connect: NodeFactory, schema: str
) -> None:
    """Three checkers on three nodes look at once, five times each: the expired claim is
    returned to exactly one of them, marked abandoned with the dead node's name and the
    finder's; a live claim is left alone."""
    dbs = [await connect() for _ in range(3)]
    owner = PgFireClaims(dbs[0])
    dead = await owner.claim("alpha", T0, "dead-node", 30.0)
    live = await owner.claim("beta", T0, "live-node", 30.0)
    assert dead is not None and live is not None
    expire(schema, dead)
    found: list[tuple[str, Claim]] = []

    async def check(name: str, claims: PgFireClaims) -> None:
        found.extend((name, claim) for claim in await claims.expired(name))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i, db in enumerate(dbs):
                for _ in range(5):
                    tg.start_soon(check, f"checker-{i}", PgFireClaims(db))

    assert len(found) == 1
    finder, claim = found[0]
    assert (claim.agent, claim.status, claim.fencing_token) == (
        "alpha",
        ClaimStatus.ABANDONED,
        dead.fencing_token,
    )
    assert (claim.abandoned_node, claim.abandoned_by, claim.outcome) == (
        "dead-node",
        finder,
        "abandoned",
    )
    assert await owner.expired("late-checker") == []
    still = await owner.get("beta", T0)
    assert still is not None and still.status is ClaimStatus.RUNNING


async def test_a_stale_holder_can_neither_renew_nor_finish_nor_commit(
    connect: NodeFactory, schema: str
) -> None:
    """A node paused past its lease (SIGSTOP) comes back: its renew, finish, fence check
    and fenced state commit all fail, even before anyone marked the claim abandoned; the
    agent's state is untouched."""
    db = await connect()
    claims, store = PgFireClaims(db), PostgresStore(db)
    await store.open()
    try:
        await store.commit(AgentState(agent="alpha", data={"n": 1}))
        claim = await claims.claim("alpha", T0, "a", 30.0)
        assert claim is not None
        expire(schema, claim)
        assert not await claims.check_fence(claim)
        assert not await claims.renew(claim)
        assert not await claims.finish(claim, "success")
        stale = AgentState(agent="alpha", data={"n": 2})
        assert not await claims.finish_and_commit(claim, "success", store, stale)
        assert (await store.load("alpha")).data == {"n": 1}
        row = await claims.get("alpha", T0)
        assert row is not None and row.status is ClaimStatus.RUNNING  # nobody looked yet
    finally:
        await store.close()


async def test_a_refused_state_still_finishes_the_claim(connect: NodeFactory, schema: str) -> None:
    """A corrupt state row refuses the fenced commit (``StateCorruptError``, row kept) but
    the claim is finished all the same: no takeover would fix it."""
    db = await connect()
    claims, store = PgFireClaims(db), PostgresStore(db)
    await store.open()
    try:
        await store.commit(AgentState(agent="alpha"))
        execute(schema, "UPDATE {s}.agents SET doc = %s::jsonb", ('{"agent": "alpha", "x": 1}',))
        claim = await claims.claim("alpha", T0, "a", 30.0)
        assert claim is not None
        with pytest.raises(StateCorruptError):
            await claims.finish_and_commit(claim, "success", store, AgentState(agent="alpha"))
        row = await claims.get("alpha", T0)
        assert row is not None and (row.status, row.outcome) == (ClaimStatus.DONE, "success")
        assert execute(schema, "SELECT doc->>'x' FROM {s}.agents") == [("1",)]
    finally:
        await store.close()


async def test_takeover_fences_out_the_old_holder(connect: NodeFactory, schema: str) -> None:
    """Policy rerun: another node takes the abandoned fire with a larger token and attempt
    2; the old holder's token never works again, the new holder finishes and commits."""
    node_a, node_b = await connect(), await connect()
    a, b = PgFireClaims(node_a), PgFireClaims(node_b)
    store_b = PostgresStore(node_b)
    await store_b.open()
    try:
        first = await a.claim("alpha", T0, "a", 30.0)
        assert first is not None
        expire(schema, first)
        (abandoned,) = await b.expired("b")
        taken = await b.takeover(abandoned, "b", 30.0, run_id="run-2")
        assert taken is not None
        assert (taken.node, taken.attempt, taken.status, taken.run_id) == (
            "b",
            2,
            ClaimStatus.RUNNING,
            "run-2",
        )
        assert taken.fencing_token > first.fencing_token
        assert taken.abandoned_node == "a"
        assert await b.takeover(abandoned, "c", 30.0) is None  # one taker only
        assert await a.claim("alpha", T0, "a", 30.0) is None  # the fire stays one row
        assert not await a.renew(first) and not await a.finish(first, "success")
        assert await b.finish_and_commit(
            taken, "success", store_b, AgentState(agent="alpha", data={"by": "b"})
        )
        done = await b.get("alpha", T0)
        assert done is not None and (done.status, done.outcome) == (ClaimStatus.DONE, "success")
        assert (await store_b.load("alpha")).data == {"by": "b"}
        assert not await b.finish(taken, "again")  # finished once
    finally:
        await store_b.close()


async def test_a_lease_runs_out_in_real_time(connect: NodeFactory) -> None:
    """Without SQL help: a 0.3 s lease not renewed is lost 0.3 s later, by database time."""
    claims = PgFireClaims(await connect())
    claim = await claims.claim("alpha", T0, "a", 0.3)
    assert claim is not None and await claims.renew(claim)
    assert await claims.check_fence(claim)
    await anyio.sleep(0.4)  # the one real wait: the database clock must move
    assert not await claims.check_fence(claim)
    assert not await claims.renew(claim)
    (abandoned,) = await claims.expired("b")
    assert abandoned.fencing_token == claim.fencing_token


async def test_status_views_and_pruning(connect: NodeFactory) -> None:
    """``running`` and ``latest`` say who runs or ran each agent; ``prune`` drops only old
    finished claims."""
    claims = PgFireClaims(await connect())
    old = await claims.claim("alpha", T0 - timedelta(days=2), "a", 30.0)
    assert old is not None and await claims.finish(old, "success")
    new = await claims.claim("alpha", T0, "b", 30.0)
    other = await claims.claim("beta", T0, "a", 30.0)
    assert new is not None and other is not None
    assert [c.agent for c in await claims.running("a")] == ["beta"]
    assert {c.agent for c in await claims.running()} == {"alpha", "beta"}
    latest = await claims.latest()
    assert (latest["alpha"].node, latest["beta"].node) == ("b", "a")
    # T0 lies in the future of the real clock or not; prune by age relative to it.
    age = (datetime.now(UTC) - (T0 - timedelta(days=1))).total_seconds()
    assert await claims.prune(age) == 1
    assert await claims.get("alpha", T0 - timedelta(days=2)) is None


async def test_bad_arguments_are_refused(connect: NodeFactory) -> None:
    """A naive planned time or a non-positive lease is a caller bug: ``ValueError``."""
    claims = PgFireClaims(await connect())
    with pytest.raises(ValueError, match="timezone-aware"):
        await claims.claim("alpha", datetime(2026, 1, 1), "a", 30.0)
    with pytest.raises(ValueError, match="lease_s"):
        await claims.claim("alpha", T0, "a", 0)


def test_claim_delay_grows_with_load_and_is_capped() -> None:
    """An idle node claims at once; a busy one waits a little longer, never long."""
    assert claim_delay(0) == 0
    assert claim_delay(5) == pytest.approx(0.1)
    assert claim_delay(1000) == 0.5
    assert claim_delay(3, per_run=0.1, cap=0.25) == 0.25


def test_config_hash_is_stable_and_order_free() -> None:
    """The same config in another key order has the same hash; any change alters it."""
    one = config_hash({"agents": {"a": {"every": 2}}, "budgets": {"day": 1.0}})
    assert one == config_hash({"budgets": {"day": 1.0}, "agents": {"a": {"every": 2}}})
    assert one != config_hash({"agents": {"a": {"every": 3}}, "budgets": {"day": 1.0}})
    assert len(one) == 16
