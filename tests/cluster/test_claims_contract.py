"""The ``FireClaims`` and ``NodeRegistry`` rules, on PostgreSQL and on the in-memory doubles.

Each kind builds "nodes" (claims of one cluster) and can make a lease run out: SQL moves
``lease_until`` back on PostgreSQL, a ``FakeClock`` moves forward in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from supervisor.cluster import Claim, ClaimStatus, FireClaims, NodeNameInUse, NodeRegistry
from supervisor.cluster.memory import MemoryCluster, MemoryFireClaims, MemoryNodeRegistry
from supervisor.testing import FakeClock
from tests.cluster.pg import drop_schema, execute, new_schema, require_postgres

T0 = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


@dataclass
class Kind:
    """A cluster of one kind: build nodes' claims and registries, expire leases, age nodes."""

    claims: Callable[[], Awaitable[FireClaims]]
    registry: Callable[[str, str], Awaitable[NodeRegistry]]
    expire: Callable[[Claim], None]
    age: Callable[[str, float], None]


@pytest.fixture(params=["memory", "postgresql"])
async def kind(request: pytest.FixtureRequest) -> AsyncIterator[Kind]:
    """Each implementation in turn (postgresql: a throwaway schema, a pool per node)."""
    if request.param == "memory":
        clock = FakeClock(T0)
        cluster = MemoryCluster(clock)

        async def memory_claims() -> FireClaims:
            return MemoryFireClaims(cluster)

        async def memory_registry(node: str, config_hash: str) -> NodeRegistry:
            return MemoryNodeRegistry(cluster, node, config_hash=config_hash)

        def advance(claim: Claim) -> None:
            clock.advance(claim.lease_s + 1)

        def age(node: str, seconds: float) -> None:
            info = cluster.nodes[node]
            cluster.nodes[node] = replace(
                info, last_seen=info.last_seen - timedelta(seconds=seconds)
            )

        yield Kind(memory_claims, memory_registry, advance, age)
        return

    from supervisor.cluster.claims import PgFireClaims
    from supervisor.cluster.nodes import PgNodeRegistry
    from supervisor.state.postgres import Database

    url, schema = require_postgres(), new_schema()
    opened: list[Database] = []

    async def connect() -> Database:
        db = Database(url, schema=schema, max_size=4)
        await db.open()
        opened.append(db)
        return db

    async def pg_claims() -> FireClaims:
        return PgFireClaims(await connect())

    async def pg_registry(node: str, config_hash: str) -> NodeRegistry:
        return PgNodeRegistry(await connect(), node, config_hash=config_hash, version="test")

    def expire(claim: Claim) -> None:
        execute(
            schema,
            "UPDATE {s}.fire_claims SET lease_until = now() - interval '1 s' "
            "WHERE fencing_token = %s",
            (claim.fencing_token,),
        )

    def age(node: str, seconds: float) -> None:
        execute(
            schema,
            "UPDATE {s}.nodes SET last_seen = last_seen - make_interval(secs => %s) "
            "WHERE node = %s",
            (seconds, node),
        )

    try:
        yield Kind(pg_claims, pg_registry, expire, age)
    finally:
        for db in opened:
            await db.close()
        drop_schema(schema)


async def test_one_claim_per_fire_and_one_run_per_agent(kind: Kind) -> None:
    """The first claim wins; the same fire again is None; a later fire of a busy agent is
    skipped; after finishing, the agent may run again."""
    a, b = await kind.claims(), await kind.claims()
    assert isinstance(a, FireClaims)
    first = await a.claim("alpha", T0, "a", 30.0, run_id="r1")
    assert first is not None and (first.status, first.node, first.run_id) == (
        ClaimStatus.RUNNING,
        "a",
        "r1",
    )
    assert await b.claim("alpha", T0, "b", 30.0) is None
    skipped = await b.claim("alpha", T0 + timedelta(seconds=2), "b", 30.0)
    assert skipped is not None and skipped.status is ClaimStatus.SKIPPED
    assert await a.finish(first, "success")
    assert not await a.finish(first, "success")
    later = await b.claim("alpha", T0 + timedelta(seconds=4), "b", 30.0)
    assert later is not None and later.status is ClaimStatus.RUNNING
    assert later.fencing_token > first.fencing_token


async def test_expiry_fences_out_the_holder_and_takeover_reruns(kind: Kind) -> None:
    """A lease run out: the holder cannot renew or finish; one checker abandons it; a
    takeover gets a larger token and attempt 2, and can finish."""
    a, b = await kind.claims(), await kind.claims()
    held = await a.claim("alpha", T0, "a", 30.0)
    assert held is not None and await a.renew(held) and await a.check_fence(held)
    kind.expire(held)
    assert not await a.check_fence(held)
    assert not await a.renew(held) and not await a.finish(held, "success")
    (abandoned,) = await b.expired("b")
    assert (abandoned.status, abandoned.abandoned_node, abandoned.abandoned_by) == (
        ClaimStatus.ABANDONED,
        "a",
        "b",
    )
    assert await a.expired("a") == []
    taken = await b.takeover(abandoned, "b", 30.0)
    assert taken is not None and taken.attempt == 2
    assert taken.fencing_token > held.fencing_token
    assert await b.takeover(abandoned, "c", 30.0) is None
    assert not await a.renew(held)
    assert await b.finish(taken, "success")


async def test_registry_liveness_mismatch_and_names(kind: Kind) -> None:
    """Heartbeats list live nodes, report config differences, and refuse a live name."""
    a = await kind.registry("a", "h1")
    c = await kind.registry("c", "h2")
    await a.register()
    await c.register()
    assert await a.heartbeat(2)
    assert [n.node for n in await a.live_nodes(30)] == ["a", "c"]
    assert [n.node for n in await a.config_mismatches(30)] == ["c"]
    with pytest.raises(NodeNameInUse):
        await (await kind.registry("a", "h1")).register()
    kind.age("c", 60)
    assert [n.node for n in await a.live_nodes(30)] == ["a"]
