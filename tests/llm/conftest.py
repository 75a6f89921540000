"""Fixtures for the LLM layer: a real fake LLM server on loopback, both budget ledgers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from supervisor.llm.fakeserver import FakeLLMServer
from tests.cluster.pg import drop_schema, new_schema, require_postgres
from tests.llm.budget_ledgers import KINDS, Ledgers


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """A started ``FakeLLMServer``; the test fails if the server itself hit a bug."""
    with FakeLLMServer() as srv:
        yield srv
    assert srv.errors == []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the fake server talk to a real server on loopback: mark them."""
    for item in items:
        if "fake_llm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(params=KINDS)
def budget_kind(request: pytest.FixtureRequest) -> str:
    """Each budget ledger kind in turn: ``store`` (``BudgetLedger``) and ``postgresql``
    (``PgBudgetLedger``; skipped when the server is unreachable, failed under CI=true)."""
    kind: str = request.param
    if kind == "postgresql":
        require_postgres()
    return kind


@pytest.fixture
async def ledgers(budget_kind: str) -> AsyncIterator[Ledgers]:
    """Builds ledgers of ``budget_kind``; a postgresql case works in a fresh schema of its
    own, dropped afterwards."""
    made = Ledgers(budget_kind, schema=new_schema() if budget_kind == "postgresql" else None)
    try:
        yield made
    finally:
        await made.aclose()
        if made.schema is not None:
            drop_schema(made.schema)
