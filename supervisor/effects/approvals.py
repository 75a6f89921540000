"""Human approval of high-risk effects: the request a reviewer sees, and how it is sent.

Decision (documented in ``EffectsService``): an approved effect runs at the agent's NEXT
call of ``ctx.effect`` with the same kind and key (normally its next run), never by itself
in the background. The approval covers exactly the params the request showed (by
fingerprint) and must be used within ``effects.approval.expiry`` of the decision; a request
not decided within the same time from its creation expires. Expired and rejected effects
never run. The ledger keeps the request, so a restart in between loses nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from supervisor.effects.ledger.base import EffectRecord, EffectStatus
from supervisor.logging import get_logger

__all__ = ["ApprovalRequest", "Notifier", "send_notification"]

_log = get_logger()


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """What a reviewer needs to decide: what will be done, by whom, why, until when."""

    id: str
    agent: str
    kind: str
    key: str
    status: EffectStatus
    #: the params, as JSON (bounded), exactly those the approval will cover
    params: Any
    #: why the agent wants it (the ``reason`` option of ``ctx.effect``)
    reason: str | None
    run_id: str | None
    requested_at: datetime
    expires_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    note: str | None = None

    @classmethod
    def from_record(cls, record: EffectRecord) -> ApprovalRequest:
        """The request carried by ``record``; raises ``ValueError`` if it carries none."""
        if record.approval_id is None or record.requested_at is None or record.expires_at is None:
            raise ValueError(f"effect {record.kind}:{record.key!r} carries no approval request")
        return cls(
            id=record.approval_id,
            agent=record.agent,
            kind=record.kind,
            key=record.key,
            status=record.status,
            params=record.params,
            reason=record.reason,
            run_id=record.run_id,
            requested_at=record.requested_at,
            expires_at=record.expires_at,
            decided_by=record.decided_by,
            decided_at=record.decided_at,
            note=record.note,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the generic webhook payload and the control API's answer."""
        return {
            "id": self.id,
            "agent": self.agent,
            "kind": self.kind,
            "key": self.key,
            "status": self.status.value,
            "params": self.params,
            "reason": self.reason,
            "run_id": self.run_id,
            "requested_at": self.requested_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "decided_by": self.decided_by,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "note": self.note,
            "approve": f"agent-supervisor approve {self.id}",
            "reject": f"agent-supervisor reject {self.id} --reason '...'",
        }


#: sends a new request to reviewers (a webhook, a chat message); awaited with a time limit
Notifier = Callable[[ApprovalRequest], Awaitable[None]]


async def send_notification(notifier: Notifier, request: ApprovalRequest, limit: float) -> bool:
    """Await ``notifier(request)`` for at most ``limit`` seconds; True when it returned.

    A failure or a timeout is logged, never raised: the request is durable and listed by
    ``agent-supervisor approvals`` whether or not the notification got through.
    """
    with anyio.move_on_after(limit) as scope:
        try:
            await notifier(request)
        except Exception as exc:
            _log.warning(
                "effect.approval.notify_failed",
                approval_id=request.id,
                error_type=type(exc).__name__,
                error=str(exc),
            )
            return False
        return True
    if scope.cancelled_caught:
        _log.warning("effect.approval.notify_timeout", approval_id=request.id, timeout_s=limit)
    return False
