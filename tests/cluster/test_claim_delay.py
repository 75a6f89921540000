"""The claim delay that spreads fires across nodes: longer the busier the node, randomised
by less than one step (ties between idle nodes), skipped by a node that is alone."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import anyio
import anyio.lowlevel
from prometheus_client import CollectorRegistry

from supervisor.cluster.base import NodeInfo
from supervisor.cluster.memory import MemoryCluster, MemoryFireClaims, MemoryNodeRegistry
from supervisor.cluster.metrics import ClusterMetrics
from supervisor.cluster.node import ClusterNode
from supervisor.config import ClusterConfig
from supervisor.metrics import Metrics
from supervisor.testing import FakeClock

T0 = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
STEP = 0.02


class RecordingClock(FakeClock):
    """A fake clock whose sleeps are recorded and take one checkpoint, no time."""

    def __init__(self) -> None:
        super().__init__(T0)
        self.slept: list[float] = []

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        await anyio.lowlevel.checkpoint()


def node(live: int, **config: float) -> tuple[ClusterNode, RecordingClock]:
    clock = RecordingClock()
    cluster = MemoryCluster(clock)
    cfg = ClusterConfig(claim_delay_per_run=STEP, **config)  # type: ignore[arg-type]
    made = ClusterNode(
        cfg,
        node="n1",
        claims=MemoryFireClaims(cluster),
        registry=MemoryNodeRegistry(cluster, "n1", config_hash="h"),
        metrics=ClusterMetrics(Metrics(CollectorRegistry())),
        clock=clock,
        rng=random.Random(7),
    )
    made.live = [NodeInfo(f"n{i}", "x", T0, T0, "h", "test", 0, 0.0) for i in range(1, live + 1)]
    return made, clock


async def claim_all(made: ClusterNode, n: int, in_flight: int = 0) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(
                lambda i=i: made.claim(  # type: ignore[misc]
                    f"a{i}", T0, run_id=f"r{i}", slots=1, in_flight=in_flight
                )
            )


async def test_an_idle_nodes_claims_wait_a_random_part_of_one_step() -> None:
    made, clock = node(live=3)
    await claim_all(made, 5)
    assert len(clock.slept) == 5
    assert all(0 <= delay < STEP for delay in clock.slept), clock.slept
    assert len(set(clock.slept)) == 5  # each fire's race is decided afresh


async def test_runs_in_flight_push_the_claim_back_up_to_the_cap() -> None:
    made, clock = node(live=2, claim_delay_max=0.1)
    await claim_all(made, 1, in_flight=3)
    assert 3 * STEP <= clock.slept[0] < 4 * STEP
    await claim_all(made, 1, in_flight=50)
    assert clock.slept[1] == 0.1


async def test_a_node_alone_claims_at_once() -> None:
    made, clock = node(live=1)
    await claim_all(made, 5, in_flight=4)
    assert clock.slept == []
