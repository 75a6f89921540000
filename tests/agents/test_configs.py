"""The bundled configs load, and every reference agent in them gets typed, valid params."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.analyst import AnalystParams
from agents.digest import DigestParams
from agents.monitor import MonitorParams
from agents.publisher import PublisherParams
from supervisor.config import load_config

REPO = Path(__file__).resolve().parents[2]
PARAMS = {
    "monitor": MonitorParams,
    "analyst": AnalystParams,
    "publisher": PublisherParams,
    "digest": DigestParams,
}


@pytest.mark.parametrize("name", ["example.yaml", "production.yaml"])
def test_bundled_config_loads_with_typed_params(name: str) -> None:
    """Each of the four reference agents is configured, imported and its params validated."""
    config = load_config(REPO / "config" / name, environ={})
    for agent, model in PARAMS.items():
        assert isinstance(config.agent(agent).params, model), agent


def test_the_example_fleet_needs_no_key_and_no_network() -> None:
    """The example talks to loopback only: its model server, its metrics, its checks."""
    config = load_config(REPO / "config" / "example.yaml", environ={})
    (provider,) = config.settings.llm.providers.values()
    assert provider.base_url.startswith("http://127.0.0.1:")
    for spec in config.agents.values():
        assert set(spec.config.http.allow_hosts) <= {"127.0.0.1"}, spec.name
    assert config.agent("publisher").config.effects.kinds["post"].rate is not None
    assert str(config.agent("publisher").config.effects.kinds["post"].rate) == "2/day"
