"""Rate limits and the Retry-After gate, on a fake clock (no real sleeps)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta

import anyio
import pytest

from supervisor.errors import CallRefused
from supervisor.llm.ratelimit import ProviderGate, RateLimiter, TokenBucket
from supervisor.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock; sleeping on it moves it."""
    return FakeClock()


class ParkedClock(FakeClock):
    """A fake clock whose ``sleep`` parks until ``release`` is set (or the sleeper cancelled),
    so that many callers can be waiting at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        await self.release.wait()


class HookClock(FakeClock):
    """A fake clock that runs ``hook`` after each sleep (something happening meanwhile)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        super().__init__()
        self.hook = hook

    async def sleep(self, delay: float) -> None:
        await super().sleep(delay)
        self.hook()


# TokenBucket


def test_bucket_starts_full_and_refills_at_capacity_per_minute(clock: FakeClock) -> None:
    """A 120/min bucket holds 120, refills 2 a second, and never holds more than 120."""
    bucket = TokenBucket(120, clock)
    assert bucket.level == 120
    bucket.take(120)
    assert bucket.wait_time(10) == pytest.approx(5.0)
    clock.advance(5)
    assert bucket.level == pytest.approx(10)
    clock.advance(3600)
    assert bucket.level == 120


def test_bucket_debt_is_waited_out(clock: FakeClock) -> None:
    """Taking more than is there leaves a debt that the next wait includes."""
    bucket = TokenBucket(60, clock)
    bucket.take(90)
    assert bucket.level == -30
    assert bucket.wait_time(1) == pytest.approx(31.0)


def test_amount_above_capacity_waits_for_a_full_bucket(clock: FakeClock) -> None:
    """A request larger than the capacity could never fit: it waits for a full bucket."""
    bucket = TokenBucket(60, clock)
    assert bucket.wait_time(1000) == 0.0
    bucket.take(30)
    assert bucket.wait_time(1000) == pytest.approx(30.0)


def test_give_back_is_capped_at_capacity(clock: FakeClock) -> None:
    """Returned units refill the bucket but not beyond its capacity."""
    bucket = TokenBucket(60, clock)
    bucket.take(10)
    bucket.give_back(100)
    assert bucket.level == 60


@pytest.mark.parametrize("capacity", [0, -1, math.inf, math.nan], ids=repr)
def test_bucket_rejects_bad_capacity(clock: FakeClock, capacity: float) -> None:
    """A capacity that is not a finite number > 0 is a ValueError."""
    with pytest.raises(ValueError):
        TokenBucket(capacity, clock)


# RateLimiter


async def test_requests_per_minute_are_spread_out(clock: FakeClock) -> None:
    """At 60 rpm the first 60 calls go at once and the 61st waits one second."""
    limiter = RateLimiter(rpm=60, tpm=0, clock=clock)
    for _ in range(60):
        assert await limiter.acquire(1, max_wait=0) == 0.0
    assert await limiter.acquire(1, max_wait=5) == pytest.approx(1.0)
    assert clock.sleeps == [pytest.approx(1.0)]


async def test_tokens_per_minute_are_spread_out(clock: FakeClock) -> None:
    """At 6000 tpm a full minute's tokens go at once; 1000 more wait ten seconds."""
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    assert await limiter.acquire(6000, max_wait=0) == 0.0
    assert await limiter.acquire(1000, max_wait=60) == pytest.approx(10.0)


async def test_wait_longer_than_max_wait_is_refused_at_once(clock: FakeClock) -> None:
    """A wait beyond max_wait raises CallRefused("rate_limited") without sleeping or taking."""
    limiter = RateLimiter(rpm=0, tpm=600, clock=clock)
    await limiter.acquire(600, max_wait=0)
    with pytest.raises(CallRefused, match=r"wait of 30\.0s") as caught:
        await limiter.acquire(300, max_wait=timedelta(seconds=29))
    assert caught.value.reason == "rate_limited"
    assert clock.sleeps == []
    # Nothing was taken by the refused call: the same request still waits 30 s, not 60.
    assert limiter.wait_time(300) == pytest.approx(30.0)


async def test_zero_limits_are_unlimited(clock: FakeClock) -> None:
    """rpm=0 and tpm=0 never wait."""
    limiter = RateLimiter(rpm=0, tpm=0, clock=clock)
    for _ in range(1000):
        assert await limiter.acquire(1_000_000, max_wait=0) == 0.0
    assert clock.sleeps == []


async def test_concurrent_callers_are_served_in_arrival_order() -> None:
    """Waiting callers queue on the bucket's debt: each waits one slot longer than the last."""
    clock = ParkedClock()
    limiter = RateLimiter(rpm=60, tpm=0, clock=clock)
    for _ in range(60):
        await limiter.acquire(1, max_wait=0)
    waits: dict[int, float] = {}

    async def one(i: int) -> None:
        waits[i] = await limiter.acquire(1, max_wait=60)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            assert len(clock.sleeps) == 5  # all five are waiting at the same time
            clock.release.set()
    assert [waits[i] for i in range(5)] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])


async def test_big_request_is_not_starved_by_small_ones() -> None:
    """A large request admitted first is not overtaken: later small ones wait behind it."""
    clock = ParkedClock()
    limiter = RateLimiter(rpm=0, tpm=600, clock=clock)
    await limiter.acquire(600, max_wait=0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: limiter.acquire(600, max_wait=120))
            await anyio.wait_all_tasks_blocked()
            assert clock.sleeps == [pytest.approx(60.0)]
            assert limiter.wait_time(10) == pytest.approx(61.0)
            clock.release.set()


async def test_cancelled_wait_gives_its_share_back() -> None:
    """A caller cancelled while waiting returns what it took; the next caller waits less."""
    clock = ParkedClock()
    limiter = RateLimiter(rpm=1, tpm=0, clock=clock)
    await limiter.acquire(1, max_wait=0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: limiter.acquire(1, max_wait=60))
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert clock.sleeps == [pytest.approx(60.0)]
    assert limiter.wait_time(1) == pytest.approx(60.0)


async def test_adjust_corrects_the_token_count(clock: FakeClock) -> None:
    """After the call, a larger actual count takes more tokens and a smaller one returns some."""
    limiter = RateLimiter(rpm=0, tpm=600, clock=clock)
    await limiter.acquire(300, max_wait=0)
    limiter.adjust(300)
    assert limiter.wait_time(60) == pytest.approx(6.0)
    limiter.adjust(-120)
    assert limiter.wait_time(60) == 0.0
    RateLimiter(0, 0, clock).adjust(5)  # no token limit: nothing to adjust


def test_negative_limits_are_rejected(clock: FakeClock) -> None:
    """A negative rpm or tpm is a ValueError."""
    with pytest.raises(ValueError):
        RateLimiter(-1, 0, clock)


# ProviderGate


async def test_open_gate_does_not_wait(clock: FakeClock) -> None:
    """With no Retry-After pending, ``wait`` returns 0 at once."""
    gate = ProviderGate(clock)
    assert gate.blocked_until is None
    assert await gate.wait(max_wait=0) == 0.0
    assert clock.sleeps == []


async def test_retry_after_holds_every_caller_until_the_deadline(clock: FakeClock) -> None:
    """After ``block_for(10)`` a caller waits the 10 s; the next one finds the gate open."""
    gate = ProviderGate(clock)
    gate.block_for(10)
    assert gate.blocked_until == pytest.approx(clock.monotonic() + 10)
    assert gate.remaining() == pytest.approx(10)
    assert await gate.wait(max_wait=30) == pytest.approx(10)
    assert gate.blocked_until is None
    assert await gate.wait(max_wait=30) == 0.0


async def test_block_for_extends_but_never_shortens(clock: FakeClock) -> None:
    """A shorter Retry-After does not cut a longer one short; a longer one extends it."""
    gate = ProviderGate(clock)
    gate.block_for(timedelta(seconds=30))
    gate.block_for(5)
    assert gate.remaining() == pytest.approx(30)
    gate.block_for(45)
    assert gate.remaining() == pytest.approx(45)
    for ignored in (0, -3, math.nan):
        gate.block_for(ignored)
    assert gate.remaining() == pytest.approx(45)


async def test_deadline_beyond_max_wait_is_refused_without_sleeping(clock: FakeClock) -> None:
    """A Retry-After longer than the caller's max_wait raises CallRefused("retry_after")."""
    gate = ProviderGate(clock)
    gate.block_for(120)
    with pytest.raises(CallRefused, match=r"retry after 120\.0s") as caught:
        await gate.wait(max_wait=60)
    assert caught.value.reason == "retry_after"
    assert clock.sleeps == []


async def test_deadline_extended_during_the_wait_is_honoured() -> None:
    """A Retry-After that arrives while a caller sleeps makes it sleep again, within max_wait."""
    gate: ProviderGate
    extended = False

    def extend_once() -> None:
        nonlocal extended
        if not extended:
            extended = True
            gate.block_for(5)

    clock = HookClock(extend_once)
    gate = ProviderGate(clock)
    gate.block_for(10)
    assert await gate.wait(max_wait=20) == pytest.approx(15)
    assert clock.sleeps == [pytest.approx(10), pytest.approx(5)]


async def test_extension_past_max_wait_refuses_after_the_first_sleep() -> None:
    """If the extension would take the total past max_wait, the caller gives up then."""
    gate: ProviderGate
    clock = HookClock(lambda: gate.block_for(5))
    gate = ProviderGate(clock)
    gate.block_for(10)
    with pytest.raises(CallRefused, match="longer than the 12s allowed"):
        await gate.wait(max_wait=12)
    assert clock.sleeps == [pytest.approx(10)]
