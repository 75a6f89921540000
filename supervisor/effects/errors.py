"""Errors of the side-effects layer (``ctx.effect``), under the supervisor's one root.

    SupervisorError
    ├── EffectError                  an effect did not run as asked; ``reason`` is a metric label
    │   ├── EffectRefused            refused before ``fn`` was called: nothing happened
    │   │   ├── EffectNotAllowed     the kind is not in the agent's allow list   (not_allowed)
    │   │   ├── EffectParamsInvalid  the params failed the gatekeeper         (invalid_params)
    │   │   ├── EffectRateLimited    the kind's window is full; carries limit, observed,
    │   │   │                        retry_after                                (rate_limited)
    │   │   ├── EffectParamsChanged  the params differ from those a human approved
    │   │   │                                                              (params_changed)
    │   │   └── EffectInvalidRequest an empty or over-long kind or key        (invalid_request)
    │   ├── EffectRejected           will never run (again): rejected by a human (rejected),
    │   │                            approval expired (approval_expired), or it ran and failed
    │   │                            the output check (output_invalid; ``rolled_back`` says
    │   │                            whether the rollback hook undid it)
    │   ├── ApprovalPending          high risk: a durable approval request waits for a human
    │   │                            (approval_pending); the run ends without executing
    │   └── EffectHeld               the outcome of an earlier attempt is unknown and no
    │                                ``reconcile`` could settle it: a human must  (held_unknown)
    ├── ApprovalError                an approve/reject command cannot be applied
    │   ├── ApprovalNotFound         no such approval id
    │   └── ApprovalClosed           already decided, expired or executed
    ├── EffectNotFound               resolve: no record for that (agent, kind, key)
    ├── InvalidTransition            a ledger write that would break the record's life cycle
    │                                (a bug: e.g. a result for an effect that never started)
    └── StateError                   (supervisor.errors)
        ├── StateCorruptError
        │   └── LedgerCorruptError   an agent's ledger file has a bad record before its end;
        │                            that agent's effects are refused until a human looks
        └── StateWriteError
            └── LedgerWriteError     a durable ledger append failed (disk full, I/O error)

    TransientError                   (supervisor.errors)
    └── EffectNotStarted             raised BY an effect's ``fn`` to state that nothing
                                     reached the target; the only way a started effect may
                                     run again by itself

An ``EffectRefused`` means nothing happened and a later call may succeed (the window moves,
the config changes). An ``EffectRejected`` or ``EffectHeld`` key will not run again by itself.
None of them is a ``TransientError``, so the run-level retry never repeats them.
"""

from __future__ import annotations

from datetime import datetime

from supervisor.errors import (
    StateCorruptError,
    StateWriteError,
    SupervisorError,
    TransientError,
)

__all__ = [
    "ApprovalClosed",
    "ApprovalError",
    "ApprovalNotFound",
    "ApprovalPending",
    "EffectError",
    "EffectHeld",
    "EffectInvalidRequest",
    "EffectNotAllowed",
    "EffectNotFound",
    "EffectNotStarted",
    "EffectParamsChanged",
    "EffectParamsInvalid",
    "EffectRateLimited",
    "EffectRefused",
    "EffectRejected",
    "InvalidTransition",
    "LedgerCorruptError",
    "LedgerWriteError",
]


class EffectError(SupervisorError):
    """An effect did not run as asked. ``reason`` is its metric label."""

    reason: str = "error"

    def __init__(self, agent: str, kind: str, key: str, message: str) -> None:
        self.agent = agent
        self.kind = kind
        self.key = key
        super().__init__(f"agent {agent!r} effect {kind}:{key!r}: {message}")


class EffectRefused(EffectError):
    """Refused before ``fn`` was called: nothing happened, nothing was recorded."""


class EffectNotAllowed(EffectRefused):
    """The agent's ``effects.allow`` list does not name this kind (least privilege)."""

    reason = "not_allowed"

    def __init__(self, agent: str, kind: str, key: str, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed
        shown = ", ".join(allowed) if allowed else "none"
        super().__init__(
            agent,
            kind,
            key,
            f"kind {kind!r} is not allowed by rule agents.{agent}.effects.allow (allowed: {shown})",
        )


class EffectParamsInvalid(EffectRefused):
    """The params failed the gatekeeper's check before the effect."""

    reason = "invalid_params"


class EffectParamsChanged(EffectRefused):
    """The params differ from those a human approved; the approval still covers those."""

    reason = "params_changed"


class EffectInvalidRequest(EffectRefused):
    """The kind or key cannot be recorded (empty, too long, bad characters in the kind)."""

    reason = "invalid_request"


class EffectRateLimited(EffectRefused):
    """The kind's window is full: ``observed`` effects in the window already, ``limit``
    allowed; ``retry_after`` is the seconds until the oldest one leaves the window."""

    reason = "rate_limited"

    def __init__(
        self,
        agent: str,
        kind: str,
        key: str,
        *,
        rule: str,
        limit: int,
        observed: int,
        retry_after: float,
    ) -> None:
        self.rule = rule
        self.limit = limit
        self.observed = observed
        self.retry_after = retry_after
        super().__init__(
            agent,
            kind,
            key,
            f"rate limit {rule} reached (limit {limit}, observed {observed}); "
            f"room again in {retry_after:.0f}s",
        )


class EffectRejected(EffectError):
    """The effect will never run (again) for this key; ``reason`` says why.

    ``rolled_back`` is True when it ran, failed the output check and the rollback hook
    undid it; False otherwise.
    """

    def __init__(
        self,
        agent: str,
        kind: str,
        key: str,
        message: str,
        *,
        reason: str,
        rolled_back: bool = False,
    ) -> None:
        self.reason = reason
        self.rolled_back = rolled_back
        super().__init__(agent, kind, key, message)


class ApprovalPending(EffectError):
    """A high-risk effect waits for a human; nothing ran. ``approval_id`` names the request."""

    reason = "approval_pending"

    def __init__(
        self, agent: str, kind: str, key: str, *, approval_id: str, expires_at: datetime
    ) -> None:
        self.approval_id = approval_id
        self.expires_at = expires_at
        super().__init__(
            agent,
            kind,
            key,
            f"waits for approval {approval_id} (expires {expires_at.isoformat()}); "
            f"it runs at the agent's next run after `agent-supervisor approve {approval_id}`",
        )


class EffectHeld(EffectError):
    """An earlier attempt may or may not have happened and nothing could settle it.

    The effect is never repeated on its own: a human resolves it (``resolve``).
    """

    reason = "held_unknown"


class EffectNotStarted(TransientError):
    """Raised by an effect's ``fn`` to say that nothing reached the target.

    Only this exception lets a started effect run again: the record becomes ``failed`` and
    the next call (for instance the run-level retry, since this is a ``TransientError``)
    runs ``fn`` afresh. Any other exception from ``fn`` leaves the outcome ``unknown``.
    """


class ApprovalError(SupervisorError):
    """An approval command cannot be applied."""

    def __init__(self, approval_id: str, message: str) -> None:
        self.approval_id = approval_id
        super().__init__(f"approval {approval_id}: {message}")


class ApprovalNotFound(ApprovalError):
    """No effect carries this approval id."""


class ApprovalClosed(ApprovalError):
    """The request was already decided, has expired or has run."""


class EffectNotFound(SupervisorError):
    """No record exists for the effect a command names."""


class InvalidTransition(SupervisorError):
    """A ledger write would break an effect's life cycle; the ledger is unchanged."""


class LedgerCorruptError(StateCorruptError):
    """An agent's ledger file holds a bad record before its end; left untouched for a human."""


class LedgerWriteError(StateWriteError):
    """A durable ledger append failed; the ledger holds what it held before the call."""
