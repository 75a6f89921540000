"""Fixtures for the LLM layer: a real fake LLM server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from supervisor.llm.fakeserver import FakeLLMServer


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
