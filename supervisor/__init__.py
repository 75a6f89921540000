"""agent-supervisor: run a fleet of AI agents on schedules, under guards.

This module exports the agent-facing contract only; agents import nothing else from
``supervisor`` (a test pins this list).
"""

from __future__ import annotations

from supervisor.context import RunContext, Step
from supervisor.effects.errors import (
    ApprovalPending,
    EffectError,
    EffectHeld,
    EffectNotStarted,
    EffectRefused,
    EffectRejected,
)
from supervisor.errors import (
    BudgetExceeded,
    CallRefused,
    LadderExhausted,
    LoopDetected,
    MaxStepsExceeded,
    PermanentError,
    RunTimeoutError,
    SupervisorError,
    TransientError,
)
from supervisor.outcome import Outcome

__version__ = "0.1.0"

__all__ = [
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
