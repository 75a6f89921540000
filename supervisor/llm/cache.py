"""Exact-match response cache: the same request to the same model within the TTL is not paid
for twice.

One JSON file per entry, named by the key (a SHA-256 hex digest), in one directory that
belongs to this process. Writes go to a temp file that is renamed over the entry, so a reader
never sees half an entry; there is no fsync, on purpose: losing an entry in a power cut costs
one more model call, while an fsync per answer would cost every call. An entry that does not
parse (a torn write after a crash, a stray edit) is a miss and is removed. Past
``max_entries`` the oldest entries are removed; past the TTL an entry is a miss.

Ages are measured on the clock's wall time (``clock.now()``), which survives restarts; a
stored time in the future (the clock was set back) counts as expired.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson

from supervisor.clock import Clock, Duration, seconds
from supervisor.llm.base import ChatResponse, Message, Usage

__all__ = ["ResponseCache", "cache_key"]

_KEY = re.compile(r"[0-9a-f]{64}")
_ENTRY = re.compile(r"([0-9a-f]{64})\.json")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.json\.[0-9a-f]{16}\.tmp")
_FORMAT = 1


def cache_key(
    provider: str,
    model: str,
    messages: Sequence[Message],
    max_tokens: int,
    temperature: float | None,
    json_mode: bool,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The SHA-256 hex digest of the canonical JSON of everything that shapes the answer.

    Raises ``ValueError`` when ``extra`` holds something JSON cannot represent.
    """
    doc = {
        "provider": provider,
        "model": model,
        "messages": [[m.role, m.content] for m in messages],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "json_mode": json_mode,
        "extra": dict(extra or {}),
    }
    try:
        canonical = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"request is not cacheable: {exc}") from exc
    return hashlib.sha256(canonical).hexdigest()


class ResponseCache:
    """Responses by key, one file each under ``directory``; blocking I/O runs in threads.

    Raises ``ValueError`` for a ttl that is not > 0 or ``max_entries`` < 1. One process per
    directory: the entry count is kept in memory after the first scan.
    """

    def __init__(
        self, directory: Path | str, *, ttl: Duration, max_entries: int, clock: Clock
    ) -> None:
        self.directory = Path(directory)
        self.ttl = seconds(ttl)
        if not self.ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._clock = clock
        # key -> stored-at (epoch seconds), oldest first; built by the first scan.
        self._index: dict[str, float] | None = None
        self._scan_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.directory)!r}, ttl={self.ttl:g}, max={self.max_entries})"

    async def get(self, key: str) -> ChatResponse | None:
        """The cached response for ``key``, or None (absent, expired or unreadable).

        Expired and unreadable entries are removed. Raises ``ValueError`` for a malformed key.
        """
        path = self._path(key)
        await self._ensure_index()
        now = self._clock.now().timestamp()
        response = await anyio.to_thread.run_sync(self._read, key, path, now)
        if response is None and self._index is not None:
            self._index.pop(key, None)
        return response

    async def put(self, key: str, response: ChatResponse) -> None:
        """Store ``response`` under ``key`` (replacing an older entry) and evict the oldest
        entries past ``max_entries``.

        Raises ``ValueError`` for a malformed key and ``OSError`` when the entry cannot be
        written (the cache is an optimisation: callers may log and carry on).
        """
        path = self._path(key)
        index = await self._ensure_index()
        now = self._clock.now().timestamp()
        raw = orjson.dumps(
            {"format": _FORMAT, "key": key, "stored_at": now, "response": _encode(response)}
        )
        await anyio.to_thread.run_sync(self._write, path, raw, now)
        index.pop(key, None)  # re-inserted at the end: it is now the newest
        index[key] = now
        excess = len(index) - self.max_entries
        if excess > 0:
            victims = list(itertools.islice(index, excess))
            for victim in victims:
                del index[victim]
            await anyio.to_thread.run_sync(self._remove_all, victims)

    def __len__(self) -> int:
        """Entries known to the index (0 before the first ``get`` or ``put``)."""
        return len(self._index or {})

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"a cache key is a SHA-256 hex digest, got {key!r}")
        return self.directory / f"{key}.json"

    async def _ensure_index(self) -> dict[str, float]:
        if self._index is None:
            async with self._scan_lock:
                if self._index is None:
                    self._index = await anyio.to_thread.run_sync(self._scan)
        return self._index

    # Everything below runs in a worker thread.

    def _scan(self) -> dict[str, float]:
        """Create the directory, drop leftover temp files, index entries by age (mtime)."""
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        found: list[tuple[float, str]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if _TEMP.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                match = _ENTRY.fullmatch(entry.name)
                if match is None:
                    continue
                with contextlib.suppress(OSError):
                    found.append((entry.stat().st_mtime, match.group(1)))
        found.sort()
        return {key: stamp for stamp, key in found}

    def _read(self, key: str, path: Path, now: float) -> ChatResponse | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return None  # unreadable: a miss; the next put replaces it
        try:
            doc = orjson.loads(raw)
            if doc["format"] != _FORMAT or doc["key"] != key:
                raise ValueError("not an entry for this key")
            stored_at = float(doc["stored_at"])
            response = _decode(doc["response"])
        except (ValueError, KeyError, TypeError):
            _remove(path)
            return None
        age = now - stored_at
        if not 0 <= age <= self.ttl:
            _remove(path)
            return None
        return response

    def _write(self, path: Path, raw: bytes, stamp: float) -> None:
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            temp.write_bytes(raw)
            # The mtime orders entries for eviction after a restart; use the clock's time.
            os.utime(temp, (stamp, stamp))
            os.replace(temp, path)
        except BaseException:
            _remove(temp)
            raise

    def _remove_all(self, keys: list[str]) -> None:
        for key in keys:
            _remove(self.directory / f"{key}.json")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _encode(response: ChatResponse) -> dict[str, Any]:
    usage = response.usage
    return {
        "text": response.text,
        "model": response.model,
        "usage": None
        if usage is None
        else {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
        },
        "finish_reason": response.finish_reason,
        "response_id": response.response_id,
    }


def _decode(doc: Any) -> ChatResponse:
    """Raises ``ValueError``, ``KeyError`` or ``TypeError`` for anything but an encoded entry."""
    text, model = doc["text"], doc["model"]
    if not isinstance(text, str) or not isinstance(model, str):
        raise TypeError("text and model must be strings")
    raw_usage = doc["usage"]
    usage = None
    if raw_usage is not None:
        counts = {
            name: raw_usage[name]
            for name in ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")
        }
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
            raise TypeError("token counts must be integers")
        usage = Usage(**counts)
    finish, response_id = doc.get("finish_reason"), doc.get("response_id")
    if not isinstance(finish, str | None) or not isinstance(response_id, str | None):
        raise TypeError("finish_reason and response_id must be strings or null")
    return ChatResponse(text, model, usage, finish, response_id)
