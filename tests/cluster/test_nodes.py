"""Node heartbeats on the real server: liveness, config hash reports, name conflicts."""

from __future__ import annotations

import pytest

from supervisor.cluster import NodeNameInUse, NodeRegistry
from supervisor.cluster.nodes import PgNodeRegistry, default_node_name, new_incarnation
from tests.cluster.conftest import NodeFactory
from tests.cluster.pg import execute

pytestmark = pytest.mark.integration


def age(schema: str, node: str, seconds: float) -> None:
    """Pretend ``node`` last heartbeat ``seconds`` ago (it was killed or paused)."""
    execute(
        schema,
        "UPDATE {s}.nodes SET last_seen = now() - make_interval(secs => %s) WHERE node = %s",
        (seconds, node),
    )


async def test_live_nodes_and_config_mismatches(connect: NodeFactory, schema: str) -> None:
    """Three nodes register; the one with another config hash is reported by the others,
    and a node that stopped heartbeating drops out of the live list."""
    regs = [
        PgNodeRegistry(await connect(), name, config_hash=h, version="0.1.0")
        for name, h in (("a", "h1"), ("b", "h1"), ("c", "h2"))
    ]
    for reg in regs:
        assert isinstance(reg, NodeRegistry)
        await reg.register()
    assert await regs[0].heartbeat(runs_in_flight=3)
    live = await regs[0].live_nodes(30)
    assert [(n.node, n.config_hash, n.runs_in_flight) for n in live] == [
        ("a", "h1", 3),
        ("b", "h1", 0),
        ("c", "h2", 0),
    ]
    assert all(n.age_s < 5 and n.version == "0.1.0" for n in live)
    assert [n.node for n in await regs[0].config_mismatches(30)] == ["c"]
    assert [n.node for n in await regs[2].config_mismatches(30)] == ["a", "b"]

    age(schema, "b", 60)
    assert [n.node for n in await regs[0].live_nodes(30)] == ["a", "c"]
    await regs[2].deregister()
    assert [n.node for n in await regs[0].live_nodes(30)] == ["a"]


async def test_a_live_name_cannot_be_taken_but_a_dead_one_can(
    connect: NodeFactory, schema: str
) -> None:
    """A second process with a live node's name is refused; once the first stops
    heartbeating it may take the name, and the first then learns it lost it."""
    first = PgNodeRegistry(await connect(), "a", config_hash="h", version="1", max_age_s=30)
    second = PgNodeRegistry(await connect(), "a", config_hash="h", version="1", max_age_s=30)
    await first.register()
    with pytest.raises(NodeNameInUse, match="in use by"):
        await second.register()
    await first.register()  # the same process registering again is fine
    age(schema, "a", 60)
    await second.register()
    assert not await first.heartbeat(0)
    assert await second.heartbeat(1)


def test_default_names() -> None:
    """The node name defaults to the host name; incarnations are unique per call."""
    assert default_node_name()
    assert new_incarnation() != new_incarnation()
