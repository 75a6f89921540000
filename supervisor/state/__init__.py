"""Per-agent state: the ``StateStore`` protocol, its stores, and ``open_store`` to pick one.

``state_dir`` in the config may be a directory or a URL:

    /var/lib/agent-supervisor, file:///var/lib/agent-supervisor   JsonFileStore (default)
    memory://                                                      MemoryStore (tests, dry runs)
    postgresql://...                                               not available yet
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from supervisor.state.base import AgentState, StateStore
from supervisor.state.jsonfile import JsonFileStore
from supervisor.state.memory import MemoryStore

__all__ = ["AgentState", "JsonFileStore", "MemoryStore", "StateStore", "open_store"]


def open_store(url_or_dir: str | Path) -> StateStore:
    """Build the store that ``url_or_dir`` names; the caller still awaits its ``open()``.

    Raises ``ValueError`` for an empty value, a ``file://`` URL naming another host, an
    unknown scheme, and ``postgresql://`` (not available yet).
    """
    if isinstance(url_or_dir, Path):
        return JsonFileStore(url_or_dir)
    if not url_or_dir:
        raise ValueError("the state store location is empty")
    if "://" not in url_or_dir:
        return JsonFileStore(Path(url_or_dir))
    url = urlsplit(url_or_dir)
    scheme = url.scheme.lower()
    if scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"a file:// state URL cannot name another host: {url_or_dir!r}")
        if not url.path:
            raise ValueError(f"the file:// state URL has no path: {url_or_dir!r}")
        return JsonFileStore(Path(unquote(url.path)))
    if scheme == "memory":
        return MemoryStore()
    if scheme in ("postgresql", "postgres"):
        raise ValueError("the PostgreSQL store is not available yet")
    raise ValueError(
        f"unknown state store URL scheme {url.scheme!r} in {url_or_dir!r}: "
        "use a directory, file://, or memory://"
    )
