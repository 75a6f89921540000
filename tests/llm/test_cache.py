"""Response cache: keys, hits, expiry, eviction, corrupt entries, restarts."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from supervisor.llm.base import ChatResponse, Message, Usage
from supervisor.llm.cache import ResponseCache, cache_key
from supervisor.testing import FakeClock

MESSAGES = (Message("system", "Be brief."), Message("user", "Grüße? 🚀"))
ANSWER = ChatResponse(
    text="Hallo 👋",
    model="gpt-4o-mini-2024-07-18",
    usage=Usage(input_tokens=12, output_tokens=3, cached_input_tokens=4, reasoning_tokens=1),
    finish_reason="stop",
    response_id="chatcmpl-1",
)


def key(n: int = 0, **changes: Any) -> str:
    """A cache key for a request; ``n`` varies the user message."""
    fields: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": (*MESSAGES, Message("user", str(n))),
        "max_tokens": 100,
        "temperature": 0.0,
        "json_mode": False,
        "extra": {"top_p": 1, "seed": 7},
    }
    fields.update(changes)
    return cache_key(**fields)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock."""
    return FakeClock()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """Where the cache keeps its entries (created on first use)."""
    return tmp_path / "llm-cache"


@pytest.fixture
def cache(directory: Path, clock: FakeClock) -> ResponseCache:
    """A cache with a one-hour TTL and room for three entries."""
    return ResponseCache(directory, ttl=3600, max_entries=3, clock=clock)


def entries(directory: Path) -> list[str]:
    """Names of the files in the cache directory, sorted."""
    return sorted(os.listdir(directory))


# Keys.


def test_key_is_a_stable_sha256_of_the_canonical_request() -> None:
    """The same request gives the same 64-hex key; the order of ``extra`` does not matter."""
    assert key() == key(extra={"seed": 7, "top_p": 1})
    assert len(key()) == 64 and int(key(), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"provider": "groq"},
        {"model": "gpt-4o"},
        {"messages": MESSAGES},
        {"max_tokens": 101},
        {"temperature": None},
        {"json_mode": True},
        {"extra": {}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_field_of_the_request_changes_the_key(change: dict[str, Any]) -> None:
    """Provider, model, messages, max_tokens, temperature, json_mode and extra all count."""
    assert key(**change) != key()


def test_role_is_part_of_the_key() -> None:
    """The same text under another role is another request."""
    as_user = cache_key("p", "m", [Message("user", "x")], 1, None, False)
    as_system = cache_key("p", "m", [Message("system", "x")], 1, None, False)
    assert as_user != as_system


def test_unserialisable_extra_is_refused() -> None:
    """An ``extra`` JSON cannot represent makes the request uncacheable: ValueError."""
    with pytest.raises(ValueError, match="not cacheable"):
        key(extra={"callback": object()})


# Hits, misses, expiry.


async def test_put_then_get_round_trips_the_response(cache: ResponseCache) -> None:
    """A stored response comes back equal, usage and unicode included."""
    await cache.put(key(), ANSWER)
    assert await cache.get(key()) == ANSWER
    bare = ChatResponse(text="", model="m", usage=None)
    await cache.put(key(1), bare)
    assert await cache.get(key(1)) == bare


async def test_unknown_key_is_a_miss(cache: ResponseCache) -> None:
    """A key never stored returns None."""
    assert await cache.get(key()) is None


async def test_entry_expires_after_the_ttl(
    cache: ResponseCache, clock: FakeClock, directory: Path
) -> None:
    """An entry is a hit up to the TTL and a miss after it; the expired file is removed."""
    await cache.put(key(), ANSWER)
    clock.advance(3600)
    assert await cache.get(key()) == ANSWER
    clock.advance(0.001)
    assert await cache.get(key()) is None
    assert entries(directory) == []
    assert len(cache) == 0


async def test_entry_from_the_future_is_a_miss(directory: Path, clock: FakeClock) -> None:
    """An entry stored "later" than now (the clock was set back) is treated as expired."""
    later = FakeClock(clock.now() + timedelta(minutes=5))
    await ResponseCache(directory, ttl=3600, max_entries=3, clock=later).put(key(), ANSWER)
    assert await ResponseCache(directory, ttl=3600, max_entries=3, clock=clock).get(key()) is None


async def test_one_file_per_entry_and_no_temp_files(cache: ResponseCache, directory: Path) -> None:
    """Each entry is ``<key>.json``; writes leave no temp files behind."""
    await cache.put(key(), ANSWER)
    await cache.put(key(), ANSWER)
    await cache.put(key(1), ANSWER)
    assert entries(directory) == sorted([f"{key()}.json", f"{key(1)}.json"])
    assert orjson.loads((directory / f"{key()}.json").read_bytes())["key"] == key()


# Eviction.


async def test_oldest_entries_are_evicted_beyond_max_entries(
    cache: ResponseCache, clock: FakeClock, directory: Path
) -> None:
    """With room for three, the fourth and fifth puts evict the two oldest."""
    for n in range(5):
        await cache.put(key(n), ANSWER)
        clock.advance(1)
    assert len(cache) == 3
    assert entries(directory) == sorted(f"{key(n)}.json" for n in (2, 3, 4))
    hits = [await cache.get(key(n)) is not None for n in range(5)]
    assert hits == [False, False, True, True, True]


async def test_storing_again_makes_an_entry_the_newest(
    cache: ResponseCache, clock: FakeClock
) -> None:
    """Re-putting the oldest entry saves it from the next eviction."""
    for n in range(3):
        await cache.put(key(n), ANSWER)
        clock.advance(1)
    await cache.put(key(0), ANSWER)
    await cache.put(key(3), ANSWER)
    assert await cache.get(key(0)) == ANSWER
    assert await cache.get(key(1)) is None


async def test_restart_indexes_existing_entries_by_age(directory: Path, clock: FakeClock) -> None:
    """A new cache on the same directory counts old entries, oldest first, and removes temp files."""
    first = ResponseCache(directory, ttl=3600, max_entries=3, clock=clock)
    for n in range(3):
        await first.put(key(n), ANSWER)
        clock.advance(1)
    stale = directory / f".{key(9)}.json.0123456789abcdef.tmp"
    stale.write_bytes(b"half")
    (directory / "notes.txt").write_bytes(b"not ours")
    second = ResponseCache(directory, ttl=3600, max_entries=3, clock=clock)
    await second.put(key(3), ANSWER)
    assert len(second) == 3
    assert not stale.exists()
    assert await second.get(key(0)) is None
    assert await second.get(key(1)) == ANSWER
    assert (directory / "notes.txt").exists()


# Corrupt entries.


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"format": 1, "key": ', id="truncated"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"format": 1}', id="missing-fields"),
        pytest.param(b'{"format": 99, "key": "K", "stored_at": 0, "response": {}}', id="format"),
        pytest.param(
            b'{"format": 1, "key": "K", "stored_at": "soon", "response": {}}', id="bad-time"
        ),
        pytest.param(
            b'{"format": 1, "key": "K", "stored_at": 1767225600, "response": '
            b'{"text": 1, "model": "m", "usage": null}}',
            id="text-not-string",
        ),
        pytest.param(
            b'{"format": 1, "key": "K", "stored_at": 1767225600, "response": '
            b'{"text": "t", "model": "m", "usage": {"input_tokens": "1", "output_tokens": 1,'
            b' "cached_input_tokens": 0, "reasoning_tokens": 0}}}',
            id="usage-not-int",
        ),
        pytest.param(
            b'{"format": 1, "key": "0000000000000000000000000000000000000000000000000000000000000000",'
            b' "stored_at": 1767225600, "response": {"text": "t", "model": "m", "usage": null}}',
            id="other-key",
        ),
    ],
)
async def test_corrupt_entry_is_a_miss_and_is_removed(
    cache: ResponseCache, directory: Path, raw: bytes
) -> None:
    """An entry that does not parse as this key's response is a miss and its file is deleted."""
    await cache.put(key(), ANSWER)
    path = directory / f"{key()}.json"
    path.write_bytes(raw.replace(b'"K"', f'"{key()}"'.encode()))
    assert await cache.get(key()) is None
    assert not path.exists()
    await cache.put(key(), ANSWER)
    assert await cache.get(key()) == ANSWER


# Misuse.


@pytest.mark.parametrize("bad", ["", "../x", "A" * 64, "0" * 63], ids=repr)
async def test_malformed_keys_are_rejected(cache: ResponseCache, bad: str) -> None:
    """Only 64 lowercase hex digits are keys: nothing else can name a file."""
    with pytest.raises(ValueError, match="SHA-256"):
        await cache.get(bad)
    with pytest.raises(ValueError, match="SHA-256"):
        await cache.put(bad, ANSWER)


@pytest.mark.parametrize(("ttl", "max_entries"), [(0, 1), (-1, 1), (1, 0)])
def test_bad_settings_are_rejected(
    directory: Path, clock: FakeClock, ttl: float, max_entries: int
) -> None:
    """A TTL that is not > 0 or max_entries < 1 is a ValueError."""
    with pytest.raises(ValueError):
        ResponseCache(directory, ttl=ttl, max_entries=max_entries, clock=clock)
