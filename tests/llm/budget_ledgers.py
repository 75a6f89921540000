"""Both budget ledgers behind one test interface, so that one test body runs on each.

``store``: ``BudgetLedger``, its windows a document of a ``CountingStore`` (a ``MemoryStore``).
``postgresql``: ``PgBudgetLedger``, its windows rows in a PostgreSQL schema of the test's own.

Every ``open`` builds a new ledger on the same durable place as the earlier ones: for the
store kind a new ``BudgetLedger`` on the same store (a restarted daemon), for postgresql a
new ``PgBudgetLedger`` on a new pool on the same schema (a restarted or another node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.llm.budget import BudgetLedger, WindowStatus
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.state import MemoryStore

if TYPE_CHECKING:
    from supervisor.llm.budget_pg import PgBudgetLedger
    from supervisor.state.postgres import Database

    #: either ledger (they share one interface)
    Ledger = BudgetLedger | PgBudgetLedger

KINDS = ["store", "postgresql"]


class CountingStore(MemoryStore):
    """A ``MemoryStore`` that counts document commits (the fsyncs a file store would do)."""

    def __init__(self) -> None:
        super().__init__()
        self.doc_commits = 0

    async def commit_doc(self, name: str, doc: dict[str, Any]) -> None:
        self.doc_commits += 1
        await super().commit_doc(name, doc)


class Ledgers:
    """Builds ledgers of one kind on one durable place (a store, or a PostgreSQL schema)."""

    def __init__(self, kind: str, schema: str | None = None) -> None:
        self.kind = kind
        #: the store of the ``store`` kind (``None`` for postgresql)
        self.store: CountingStore | None = CountingStore() if kind == "store" else None
        #: the schema of the ``postgresql`` kind (``None`` for store)
        self.schema = schema
        #: every pool opened, closed by the fixture
        self.databases: list[Database] = []

    @property
    def is_pg(self) -> bool:
        return self.kind == "postgresql"

    async def database(self) -> Database:
        """A newly opened pool on this kind's schema (a node of its own)."""
        from supervisor.state.postgres import Database
        from tests.cluster.pg import require_postgres

        assert self.schema is not None
        db = Database(require_postgres(), schema=self.schema, max_size=8)
        await db.open()
        self.databases.append(db)
        return db

    async def open(self, clock: Any, **windows: LimitConfig) -> Ledger:
        """A new, loaded ledger with the given limits (the others unlimited)."""
        ledger = await self.build(clock, **windows)
        await ledger.load()
        return ledger

    async def build(self, clock: Any, **windows: LimitConfig) -> Ledger:
        """A new ledger with the given limits, not loaded."""
        limits = BudgetsConfig(**windows)
        ledger: Ledger
        if self.is_pg:
            from supervisor.llm.budget_pg import PgBudgetLedger

            ledger = PgBudgetLedger(await self.database(), clock, limits)
        else:
            assert self.store is not None
            ledger = BudgetLedger(self.store, clock, limits)
        return ledger

    @staticmethod
    async def refresh(ledger: Ledger) -> None:
        """Make ``snapshot()`` show every writer's spend: ``PgBudgetLedger`` reports what it
        last read, so it re-reads the rows; ``BudgetLedger`` holds it all in memory already."""
        if not isinstance(ledger, BudgetLedger):
            await ledger.refresh()

    async def aclose(self) -> None:
        for db in self.databases:
            await db.close()


def counted(status: WindowStatus) -> tuple[float, int]:
    """What a window counts against its limit: spent plus reserved, in USD and tokens."""
    return (
        status.spent_usd + status.reserved_usd,
        status.spent_tokens + status.reserved_tokens,
    )
