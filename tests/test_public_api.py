"""The agent-facing contract: ``supervisor.__all__`` is pinned, and agents use nothing else."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import supervisor

#: Changing this list changes what agent authors may rely on: a breaking change.
PUBLIC_NAMES = [
    "ApprovalPending",
    "BudgetExceeded",
    "CallRefused",
    "EffectError",
    "EffectHeld",
    "EffectNotStarted",
    "EffectRefused",
    "EffectRejected",
    "LadderExhausted",
    "LoopDetected",
    "MaxStepsExceeded",
    "Outcome",
    "PermanentError",
    "RunContext",
    "RunTimeoutError",
    "Step",
    "SupervisorError",
    "TransientError",
    "__version__",
]

AGENTS_DIR = Path(__file__).resolve().parent.parent / "agents"
AGENT_FILES = sorted(AGENTS_DIR.rglob("*.py"))


def test_all_is_pinned() -> None:
    """supervisor.__all__ is exactly the pinned list, sorted, without duplicates."""
    assert supervisor.__all__ == PUBLIC_NAMES
    assert PUBLIC_NAMES == sorted(PUBLIC_NAMES)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_each_public_name_is_importable(name: str) -> None:
    """`from supervisor import <name>` works for every public name."""
    module = importlib.import_module("supervisor")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from supervisor import {name}", namespace)
    assert namespace[name] is getattr(supervisor, name)


def test_star_import_gives_exactly_the_public_names() -> None:
    """`from supervisor import *` binds the public names and nothing else."""
    namespace: dict[str, object] = {}
    exec("from supervisor import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC_NAMES


def private_uses(source: str) -> list[str]:
    """What ``source`` takes from ``supervisor`` beyond its public names, one line each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("supervisor."):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "supervisor":
                found += [
                    f"line {node.lineno}: from supervisor import {a.name}"
                    for a in node.names
                    if a.name != "*" and a.name not in PUBLIC_NAMES
                ]
        elif isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("supervisor.")
            ]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "supervisor"
            and node.attr not in PUBLIC_NAMES
        ):
            found.append(f"line {node.lineno}: supervisor.{node.attr}")
    return found


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("from supervisor import RunContext, TransientError", False),
        ("from supervisor import *", False),
        ("import supervisor\nsupervisor.Outcome.SUCCESS", False),
        ("from . import helpers", False),
        ("from supervisor.runner import Runner", True),
        ("from supervisor.context import RunContext", True),
        ("import supervisor.testing", True),
        ("import supervisor.state.memory as m", True),
        ("from supervisor import Runner", True),
        ("import supervisor\nsupervisor.runner.Runner", True),
    ],
    ids=[
        "public-names",
        "star",
        "public-attribute",
        "relative-import",
        "from-submodule",
        "public-name-via-submodule",
        "import-submodule",
        "import-submodule-as",
        "unknown-name",
        "private-attribute",
    ],
)
def test_the_import_check_flags_private_uses(source: str, flagged: bool) -> None:
    """The checker below catches every way of reaching past the public names."""
    assert bool(private_uses(source)) is flagged


def test_there_are_agents_to_check() -> None:
    """The agents/ package is found, so the per-agent check below is not vacuous."""
    assert AGENTS_DIR / "heartbeat.py" in AGENT_FILES


@pytest.mark.parametrize("path", AGENT_FILES, ids=[p.name for p in AGENT_FILES])
def test_agents_import_only_public_names(path: Path) -> None:
    """Reference agents use only `supervisor`'s public names, never its submodules."""
    assert private_uses(path.read_text()) == []
