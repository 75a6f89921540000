"""The PostgreSQL schema, as an ordered list of versioned migrations.

Each migration is applied once, in order, inside the transaction ``apply_migrations`` holds
the advisory lock in. ``{s}`` stands for the schema (quoted as an identifier); nothing else in
these texts may use braces. Migrations are append-only: a released one is never edited, a
change is a new version. A node refuses to start on a schema newer than the last version
listed here (see ``apply_migrations``); nodes already running are not affected, and every
change is additive, so a rolling upgrade restarts each node on the new package in turn.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema change: its version (1, 2, ...), a short name, and its SQL statements."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "agent state and supervisor documents",
        (
            # One row per agent; ``doc`` is the AgentState as JSON. ``version`` counts the
            # commits of the row (1 for the first), ``updated_at`` is database time.
            """
            CREATE TABLE {s}.agents (
                agent text PRIMARY KEY,
                doc jsonb NOT NULL,
                version integer NOT NULL DEFAULT 1,
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            # Supervisor-wide documents (the budget ledger's windows, "budget").
            """
            CREATE TABLE {s}.docs (
                name text PRIMARY KEY,
                doc jsonb NOT NULL,
                version integer NOT NULL DEFAULT 1,
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
    Migration(
        2,
        "effect ledger",
        (
            # The latest record of every (agent, kind, key); ``doc`` is EffectRecord.to_doc().
            # ``node`` wrote the latest record: an intent is orphaned only once that node is
            # gone (see supervisor/effects/ledger/postgres.py). ``seq`` keeps first-write order.
            """
            CREATE TABLE {s}.effects (
                agent text NOT NULL,
                kind text NOT NULL,
                key text NOT NULL,
                status text NOT NULL,
                doc jsonb NOT NULL,
                node text NOT NULL,
                approval_id text,
                intent_at timestamptz,
                updated_at timestamptz NOT NULL,
                written_at timestamptz NOT NULL DEFAULT now(),
                seq bigserial NOT NULL,
                PRIMARY KEY (agent, kind, key)
            )
            """,
            "CREATE INDEX effects_approval ON {s}.effects (approval_id) "
            "WHERE approval_id IS NOT NULL",
            "CREATE INDEX effects_intents ON {s}.effects (node) WHERE status = 'intent'",
            "CREATE INDEX effects_starts ON {s}.effects (agent, kind, intent_at)",
        ),
    ),
    Migration(
        3,
        "fire claims and node heartbeats",
        (
            # One row per planned fire: the unique key makes exactly one node win it.
            # ``fencing_token`` grows with every claim and every takeover; ``lease_until`` is
            # database time. ``attempt`` counts takeovers (1 = first run of the fire).
            # ``slot`` is one of the agent's max_concurrent run slots: at most one running
            # claim per (agent, slot), so an agent's concurrency limit holds cluster-wide; a
            # fire that finds every slot busy is recorded as ``skipped``.
            """
            CREATE TABLE {s}.fire_claims (
                agent text NOT NULL,
                planned_at timestamptz NOT NULL,
                node text NOT NULL,
                fencing_token bigserial NOT NULL,
                lease_until timestamptz NOT NULL,
                lease_s double precision NOT NULL CHECK (lease_s > 0),
                slot integer NOT NULL DEFAULT 0,
                status text NOT NULL
                    CHECK (status IN ('running', 'done', 'abandoned', 'skipped')),
                claimed_at timestamptz NOT NULL DEFAULT now(),
                finished_at timestamptz,
                outcome text,
                run_id text,
                attempt integer NOT NULL DEFAULT 1,
                abandoned_node text,
                abandoned_by text,
                PRIMARY KEY (agent, planned_at)
            )
            """,
            "CREATE UNIQUE INDEX fire_claims_token ON {s}.fire_claims (fencing_token)",
            "CREATE UNIQUE INDEX fire_claims_one_running ON {s}.fire_claims (agent, slot) "
            "WHERE status = 'running'",
            "CREATE INDEX fire_claims_running ON {s}.fire_claims (lease_until) "
            "WHERE status = 'running'",
            "CREATE INDEX fire_claims_node ON {s}.fire_claims (node, status)",
            # One row per node; ``incarnation`` tells two processes using one name apart.
            """
            CREATE TABLE {s}.nodes (
                node text PRIMARY KEY,
                incarnation text NOT NULL,
                started_at timestamptz NOT NULL,
                last_seen timestamptz NOT NULL,
                config_hash text NOT NULL,
                version text NOT NULL,
                runs_in_flight integer NOT NULL DEFAULT 0
            )
            """,
        ),
    ),
    Migration(
        4,
        "cluster-wide budget windows",
        (
            # One row per window and period, amounts in nano-dollars; ``reserved`` holds the
            # worst cases of calls in flight. A reservation is a conditional UPDATE, so no
            # number of concurrent nodes can push spent + reserved past a limit.
            """
            CREATE TABLE {s}.budget_windows (
                key text PRIMARY KEY,
                kind text NOT NULL,
                scope text NOT NULL,
                period text NOT NULL,
                spent bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
                reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
                spent_tokens bigint NOT NULL DEFAULT 0 CHECK (spent_tokens >= 0),
                reserved_tokens bigint NOT NULL DEFAULT 0 CHECK (reserved_tokens >= 0),
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            "CREATE INDEX budget_windows_period ON {s}.budget_windows (period)",
        ),
    ),
)
