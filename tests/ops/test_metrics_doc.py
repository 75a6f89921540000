"""docs/metrics.md is generated from supervisor/metrics.py and must not go stale."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry

from supervisor.metrics import Metrics, describe
from supervisor.metrics_doc import render
from tests.ops.conftest import REPO

DOC = REPO / "docs" / "metrics.md"
REGENERATE = "python -m supervisor.metrics_doc > docs/metrics.md"


def test_reference_is_current() -> None:
    """docs/metrics.md is exactly what `python -m supervisor.metrics_doc` renders."""
    assert DOC.read_text() == render(), f"docs/metrics.md is stale: run `{REGENERATE}`"


def test_every_family_the_daemon_registers_is_documented() -> None:
    """Every family in a fresh ``Metrics`` registry has a row in the reference."""
    registry = CollectorRegistry()
    Metrics(registry)
    documented = {doc.name for doc in describe()}
    registered = {family.name for family in registry.collect()}
    # prometheus-client drops _total from counter family names
    missing = {
        name for name in registered if name not in documented and f"{name}_total" not in documented
    }
    assert not missing, f"metrics without a MetricDoc: {sorted(missing)}"
    text = render()
    assert all(f"| `{name}` |" in text for name in documented)


def test_module_prints_the_reference() -> None:
    """`python -m supervisor.metrics_doc` writes render() to stdout."""
    out = subprocess.run(
        [sys.executable, "-m", "supervisor.metrics_doc"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.stdout == render()
