"""``keep_lease``: a long run keeps its claim; a lost lease stops the run before it commits."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest

from supervisor.cluster import Claim, ClaimStatus
from supervisor.cluster.claims import PgFireClaims
from supervisor.cluster.lease import keep_lease
from supervisor.errors import StateError
from supervisor.testing import FakeClock
from tests.cluster.conftest import NodeFactory
from tests.cluster.pg import execute

T0 = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


class Unreachable:
    """A ``FireClaims`` whose database answered ``ok`` renewals, then went away."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.calls = 0

    async def renew(self, claim: Claim) -> bool:
        self.calls += 1
        if self.calls > self.ok:
            raise StateError("*", "connection refused")
        return True


def claim(lease_s: float = 3.0) -> Claim:
    """A claim as ``claim()`` would return it."""
    return Claim("alpha", T0, "a", 1, T0, lease_s, ClaimStatus.RUNNING, T0)


async def test_unreachable_database_loses_the_lease_when_it_would_have_run_out() -> None:
    """Renewals that fail are retried until the lease would have expired by the node's own
    clock, counted from the last renewal that worked; then the run is stopped."""
    clock = FakeClock()
    claims = Unreachable(ok=2)
    with anyio.fail_after(5):
        async with keep_lease(claims, claim(3.0), clock=clock) as lease:  # type: ignore[arg-type]
            await anyio.sleep_forever()
    assert lease.lost and lease.renewals == 2
    assert "could not renew before the lease ran out" in (lease.reason or "")
    # Renewals asked at t=1 and t=2 worked, so the lease is good until t=5: tries at t=3
    # and t=4 fail and are retried, the one at t=5 fails and gives up.
    assert claims.calls == 5


async def test_the_body_exceptions_pass_through_unwrapped() -> None:
    """An exception of the run itself reaches the caller as raised, not in a group."""
    with pytest.raises(KeyError, match="boom"):
        async with keep_lease(Unreachable(ok=99), claim(), clock=FakeClock()):  # type: ignore[arg-type]
            raise KeyError("boom")


@pytest.mark.integration
async def test_a_run_longer_than_its_lease_keeps_it(connect: NodeFactory) -> None:
    """A 1.2 s run on a 0.45 s lease renews it and still holds the fence at the end."""
    claims = PgFireClaims(await connect())
    held = await claims.claim("alpha", T0, "a", 0.45)
    assert held is not None
    with anyio.fail_after(10):
        async with keep_lease(claims, held) as lease:
            await anyio.sleep(1.2)
    assert not lease.lost and lease.renewals >= 4
    assert await claims.finish(held, "success")


@pytest.mark.integration
async def test_a_taken_over_lease_stops_the_run(connect: NodeFactory, schema: str) -> None:
    """While a run goes on, its claim is abandoned and taken over by another node: the run
    is cancelled at its next renewal and its fenced commit is refused."""
    a, b = PgFireClaims(await connect()), PgFireClaims(await connect())
    held = await a.claim("alpha", T0, "a", 0.6)
    assert held is not None
    finished_body = False
    with anyio.fail_after(10):
        async with keep_lease(a, held) as lease:
            execute(schema, "UPDATE {s}.fire_claims SET lease_until = now() - interval '1 s'")
            (abandoned,) = await b.expired("b")
            assert await b.takeover(abandoned, "b", 30.0) is not None
            await anyio.sleep(5)
            finished_body = True
    assert lease.lost and not finished_body
    assert not await a.finish(held, "success")
