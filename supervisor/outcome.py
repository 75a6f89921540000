"""How a run ended, and the record kept of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """The one word that says how a fire of an agent ended."""

    #: the agent returned normally
    SUCCESS = "success"
    #: the agent raised (after any retries)
    FAILURE = "failure"
    #: the run passed its deadline and was cancelled
    TIMEOUT = "timeout"
    #: the agent asked for a step past its limit
    MAX_STEPS = "max_steps"
    #: a spend limit would have been passed (budget guard)
    BUDGET_EXCEEDED = "budget_exceeded"
    #: a loop detector stopped the run (the same call repeated, or steps that change nothing)
    LOOP_DETECTED = "loop_detected"
    #: the run made no step and no external call for longer than its stall limit
    STALLED = "stalled"
    #: a high-risk effect waits for a human; the run stopped without executing it
    AWAITING_APPROVAL = "awaiting_approval"
    #: the daemon stopped (or an operator cancelled) while the run was in flight
    CANCELLED = "cancelled"
    #: the fire came while the previous run of the agent was still going
    SKIPPED_OVERLAP = "skipped_overlap"
    #: the agent is paused
    SKIPPED_PAUSED = "skipped_paused"
    #: the agent's circuit breaker is open
    SKIPPED_CIRCUIT_OPEN = "skipped_circuit_open"
    #: cluster: another node claimed this fire first and runs it
    SKIPPED_CLAIMED_ELSEWHERE = "skipped_claimed_elsewhere"
    #: cluster: the node lost the fire's lease mid-run (paused, cut off from the database);
    #: the run was stopped and its results were not committed
    LEASE_LOST = "lease_lost"

    @property
    def skipped(self) -> bool:
        """True for outcomes where the agent's code never ran."""
        return self.value.startswith("skipped_")

    @property
    def counts_as_failure(self) -> bool:
        """True for outcomes that feed the circuit breaker's failure count."""
        return self in _FAILURES


_FAILURES = frozenset(
    {
        Outcome.FAILURE,
        Outcome.TIMEOUT,
        Outcome.MAX_STEPS,
        Outcome.BUDGET_EXCEEDED,
        Outcome.LOOP_DETECTED,
        Outcome.STALLED,
    }
)


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What is kept of one fire: the run summary written to state and logged."""

    agent: str
    run_id: str
    outcome: Outcome
    planned_at: datetime | None
    started_at: datetime
    finished_at: datetime
    duration_s: float
    lag_s: float
    steps: int
    attempts: int
    error: str | None = None
    error_type: str | None = None
    partial: Any = None
    result: Any = None
    trigger: str = "schedule"
    extra: dict[str, Any] = field(default_factory=dict)
