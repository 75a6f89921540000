"""Node heartbeats in PostgreSQL: who is alive, what each runs, whether configs agree.

    nodes (node text PK, incarnation, started_at, last_seen, config_hash, version,
           runs_in_flight)

``last_seen`` is database time. A node is live while ``now() - last_seen`` is under the
``max_age`` the caller gives (a few heartbeat intervals). ``incarnation`` tells two
processes using one node name apart: a second live process with a taken name is refused at
``register``, and a node whose name was taken over (it was presumed dead, then came back)
learns it from ``heartbeat`` returning False.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import UTC
from typing import Any

import psycopg
from psycopg.rows import dict_row

from supervisor.cluster.base import NodeInfo, NodeNameInUse
from supervisor.errors import StateError
from supervisor.state.postgres import Database, describe

__all__ = ["PgNodeRegistry", "default_node_name", "new_incarnation"]

_COLUMNS = (
    "node, incarnation, started_at, last_seen, config_hash, version, runs_in_flight, "
    "extract(epoch FROM now() - last_seen)::float8 AS age_s"
)


def default_node_name() -> str:
    """The host name: the node label when the config names none."""
    return socket.gethostname() or "node"


def new_incarnation() -> str:
    """``host:pid:random``: unique to this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class PgNodeRegistry:
    """``NodeRegistry`` on a ``Database`` (opened and closed by its owner)."""

    def __init__(
        self,
        database: Database,
        node: str,
        *,
        config_hash: str,
        version: str,
        incarnation: str | None = None,
        max_age_s: float = 30.0,
    ) -> None:
        self.database = database
        self.node = node
        self.config_hash = config_hash
        self.version = version
        self.incarnation = incarnation or new_incarnation()
        #: a heartbeat older than this means the node is gone (``register`` uses it)
        self.max_age_s = max_age_s

    def __repr__(self) -> str:
        return f"PgNodeRegistry({self.node!r}, {self.incarnation!r})"

    async def register(self) -> None:
        """Write this node's row, replacing a stale one of the same name.

        Raises ``NodeNameInUse`` when another process heartbeat under this name within
        ``max_age_s`` (two nodes with one name would fence each other out) and
        ``StateError`` when the database cannot be reached.
        """
        try:
            async with self.database.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    self.database.q(
                        f"SELECT {_COLUMNS} FROM {{s}}.nodes WHERE node = %s FOR UPDATE"
                    ),
                    (self.node,),
                )
                row = await cur.fetchone()
                if (
                    row is not None
                    and row["incarnation"] != self.incarnation
                    and row["age_s"] < self.max_age_s
                ):
                    raise NodeNameInUse(self.node, row["incarnation"], row["age_s"])
                await conn.execute(
                    self.database.q(
                        "INSERT INTO {s}.nodes (node, incarnation, started_at, last_seen, "
                        "config_hash, version, runs_in_flight) "
                        "VALUES (%s, %s, now(), now(), %s, %s, 0) "
                        "ON CONFLICT (node) DO UPDATE SET incarnation = EXCLUDED.incarnation, "
                        "started_at = now(), last_seen = now(), "
                        "config_hash = EXCLUDED.config_hash, version = EXCLUDED.version, "
                        "runs_in_flight = 0"
                    ),
                    (self.node, self.incarnation, self.config_hash, self.version),
                )
        except psycopg.Error as exc:
            raise StateError("*", f"cannot register node {self.node!r}: {describe(exc)}") from exc

    async def heartbeat(self, runs_in_flight: int) -> bool:
        """Refresh ``last_seen``, the run count and the config hash (it changes on reload).

        Returns False when the row now belongs to another incarnation (this process was
        presumed dead and its name reused): the node must stop claiming. Raises
        ``StateError`` when the database cannot be reached.
        """
        try:
            async with self.database.connection() as conn:
                cur = await conn.execute(
                    self.database.q(
                        "UPDATE {s}.nodes SET last_seen = now(), runs_in_flight = %s, "
                        "config_hash = %s WHERE node = %s AND incarnation = %s RETURNING node"
                    ),
                    (runs_in_flight, self.config_hash, self.node, self.incarnation),
                )
                return await cur.fetchone() is not None
        except psycopg.Error as exc:
            raise StateError("*", f"cannot heartbeat node {self.node!r}: {describe(exc)}") from exc

    async def deregister(self) -> None:
        """Delete this node's row (clean shutdown: its runs are drained)."""
        try:
            async with self.database.connection() as conn:
                await conn.execute(
                    self.database.q("DELETE FROM {s}.nodes WHERE node = %s AND incarnation = %s"),
                    (self.node, self.incarnation),
                )
        except psycopg.Error as exc:
            raise StateError("*", f"cannot deregister {self.node!r}: {describe(exc)}") from exc

    async def live_nodes(self, max_age_s: float | None = None) -> list[NodeInfo]:
        """Nodes seen within ``max_age_s`` (default ``self.max_age_s``), by name."""
        age = self.max_age_s if max_age_s is None else max_age_s
        try:
            async with self.database.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    self.database.q(
                        f"SELECT {_COLUMNS} FROM {{s}}.nodes "
                        "WHERE last_seen > now() - make_interval(secs => %s) ORDER BY node"
                    ),
                    (age,),
                )
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise StateError("*", f"cannot list nodes: {describe(exc)}") from exc
        return [_info(row) for row in rows]

    async def config_mismatches(self, max_age_s: float | None = None) -> list[NodeInfo]:
        """Live nodes whose config hash is not this node's: report them, do not merge."""
        return [n for n in await self.live_nodes(max_age_s) if n.config_hash != self.config_hash]


def _info(row: dict[str, Any]) -> NodeInfo:
    return NodeInfo(
        node=row["node"],
        incarnation=row["incarnation"],
        started_at=row["started_at"].astimezone(UTC),
        last_seen=row["last_seen"].astimezone(UTC),
        config_hash=row["config_hash"],
        version=row["version"],
        runs_in_flight=row["runs_in_flight"],
        age_s=max(0.0, float(row["age_s"])),
    )
