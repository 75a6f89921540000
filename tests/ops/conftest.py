"""Helpers for the operations tests: real system tools, skipped locally, required in CI.

These tests drive tools the Python environment cannot provide (``systemd-analyze``,
``promtool``, ``prometheus``, ``systemd-nspawn``, ``debootstrap``). ``tests/run`` installs
the Debian packages listed in ``tests/system-packages.txt`` when ``CI=true`` and root; locally
a test whose tool is missing is skipped with the reason, and under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
OPS_DIR = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``, or fail it under ``CI=true`` (CI must have the tool)."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required)", pytrace=False)
    pytest.skip(reason)


def need(tool: str, package: str) -> str:
    """The absolute path of ``tool``; skips (fails in CI) naming the Debian package."""
    path = shutil.which(tool)
    if path is None:
        unavailable(
            f"{tool} not found: install the Debian package {package!r} "
            "(tests/run does it when CI=true and root)"
        )
    return path


def run(
    args: Sequence[str], timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; never raises for a non-zero status."""
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
