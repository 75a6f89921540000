"""Keeping a claim's lease while its run goes on, and stopping the run when it is lost.

    async with keep_lease(claims, claim) as lease:
        ...run the agent...                # cancelled at once if the lease is lost
    if lease.lost:
        ...do not commit: the fire may already run elsewhere...

A task renews the lease every ``lease_s / 3`` seconds. A renewal the database refuses means
the lease is gone (expired, abandoned, taken over): the body is cancelled and ``lost`` set.
A renewal that fails for another reason (the database is unreachable) is retried until the
lease would have run out by this node's monotonic clock, counted from the last renewal that
succeeded; then the lease is treated as lost too, since another node may take it over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from supervisor.clock import Clock, SystemClock
from supervisor.cluster.base import Claim, FireClaims
from supervisor.errors import StateError
from supervisor.logging import get_logger

__all__ = ["Lease", "keep_lease"]

_log = get_logger()


class Lease:
    """What ``keep_lease`` yields: the claim, and whether its lease was lost."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        #: True once the lease is gone; the run's results must not be committed
        self.lost = False
        #: renewals that succeeded
        self.renewals = 0
        #: why the lease was lost (for the log line and the run record)
        self.reason: str | None = None


@asynccontextmanager
async def keep_lease(
    claims: FireClaims,
    claim: Claim,
    *,
    clock: Clock | None = None,
    every: float | None = None,
    on_lost: Callable[[], None] | None = None,
) -> AsyncIterator[Lease]:
    """Renew ``claim`` in the background while the body runs; cancel the body if it is lost.

    ``every`` defaults to a third of the lease. The body's own exceptions pass through; a
    cancellation caused by the lost lease does not (check ``lease.lost``). With ``on_lost``,
    the lost lease calls it instead of cancelling the body (the runner stops the run its own
    way, so that the run still ends with a record).
    """
    clock = clock or SystemClock()
    interval = every if every is not None else claim.lease_s / 3
    lease = Lease(claim)
    try:
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as body:
                stop = on_lost if on_lost is not None else body.cancel
                tg.start_soon(_renew, claims, lease, clock, interval, stop)
                try:
                    yield lease
                finally:
                    tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The renewal task raises nothing of its own: what is in the group is the body's
        # exception, which the caller expects as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _renew(
    claims: FireClaims, lease: Lease, clock: Clock, interval: float, stop: Callable[[], None]
) -> None:
    claim = lease.claim
    # The lease was granted at most now; by our clock it runs out lease_s after the last
    # renewal we know succeeded (the database may think it ends sooner, never later).
    good_until = clock.monotonic() + claim.lease_s
    while True:
        await clock.sleep(interval)
        asked_at = clock.monotonic()
        try:
            renewed = await claims.renew(claim)
        except StateError as exc:
            if clock.monotonic() < good_until:
                _log.warning("cluster.lease.renew_failed", agent=claim.agent, error=str(exc))
                continue
            renewed, lease.reason = False, f"could not renew before the lease ran out: {exc}"
        if not renewed:
            lease.lost = True
            lease.reason = lease.reason or "the lease expired or was taken over"
            _log.warning(
                "cluster.lease.lost",
                agent=claim.agent,
                planned_at=claim.planned_at.isoformat(),
                fencing_token=claim.fencing_token,
                reason=lease.reason,
            )
            stop()
            return
        lease.renewals += 1
        good_until = asked_at + claim.lease_s
