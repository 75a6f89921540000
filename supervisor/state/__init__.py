"""Per-agent state: the ``StateStore`` protocol, its stores, and ``open_store`` to pick one.

``state_dir`` in the config may be a directory or a URL:

    /var/lib/agent-supervisor, file:///var/lib/agent-supervisor   JsonFileStore (default)
    memory://                                                      MemoryStore (tests, dry runs)
    postgresql://user@host/db[?schema=name]                        PostgresStore
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from supervisor.state.base import AgentState, StateStore
from supervisor.state.jsonfile import JsonFileStore
from supervisor.state.memory import MemoryStore

if TYPE_CHECKING:
    from supervisor.state.postgres import PostgresStore

__all__ = [
    "AgentState",
    "JsonFileStore",
    "MemoryStore",
    "PostgresStore",
    "StateStore",
    "open_store",
]


def __getattr__(name: str) -> object:
    # psycopg is an optional extra: import it only when PostgreSQL is asked for.
    if name == "PostgresStore":
        from supervisor.state.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url_or_dir: str | Path) -> StateStore:
    """Build the store that ``url_or_dir`` names; the caller still awaits its ``open()``.

    A ``postgresql://`` (or ``postgres://``) URL gives a ``PostgresStore`` with its own
    connection pool; a ``schema=`` query parameter names the schema (default
    ``agent_supervisor``). Raises ``ValueError`` for an empty value, a ``file://`` URL naming
    another host, an unknown scheme, an invalid schema name, and ``postgresql://`` when
    psycopg is not installed (the ``postgres`` extra).
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
        return _postgres_store(url_or_dir)
    raise ValueError(
        f"unknown state store URL scheme {url.scheme!r} in {url_or_dir!r}: "
        "use a directory, file://, memory://, or postgresql://"
    )


def _postgres_store(url: str) -> StateStore:
    try:
        from supervisor.state.postgres import DEFAULT_SCHEMA, PostgresStore, split_schema
    except ImportError as exc:  # psycopg missing
        raise ValueError(
            f"a postgresql:// store needs psycopg: install agent-supervisor[postgres] ({exc})"
        ) from exc
    dsn, schema = split_schema(url)
    return PostgresStore(dsn, schema=schema or DEFAULT_SCHEMA)
