"""The control surface behind the CLI and the control API: approvals and human resolution.

``EffectsService`` inherits these methods; they share its ledger, clock, config, per-key
locks and counters, so a decision and a run acting on the same key never interleave.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from supervisor.clock import Clock
from supervisor.effects.approvals import ApprovalRequest
from supervisor.effects.calls import KeyLocks
from supervisor.effects.config import EffectsConfig
from supervisor.effects.errors import (
    ApprovalClosed,
    ApprovalNotFound,
    EffectNotFound,
    InvalidTransition,
)
from supervisor.effects.ledger.base import EffectLedger, EffectRecord, EffectStatus

__all__ = ["ControlSurface"]


class ControlSurface:
    """approve, reject, pending, expire_due, resolve (see ``approvals`` for the policy)."""

    ledger: EffectLedger
    clock: Clock
    config: EffectsConfig
    _keys: KeyLocks

    def _event(
        self,
        ctx: Any,
        kind: str,
        key: str,
        event: str,
        *,
        agent: str | None = None,
        level: str = "info",
        **fields: Any,
    ) -> None:
        raise NotImplementedError

    async def pending(self) -> list[ApprovalRequest]:
        """Approval requests waiting for a decision, oldest first (expired ones included
        until ``expire_due`` or the next call marks them)."""
        records = await self.ledger.list(status=EffectStatus.PENDING_APPROVAL)
        requests = [ApprovalRequest.from_record(r) for r in records]
        return sorted(requests, key=lambda r: r.requested_at)

    async def approve(self, approval_id: str, by: str) -> ApprovalRequest:
        """Approve a pending request; the effect runs at the agent's next call for its key.

        Raises ``ApprovalNotFound``, and ``ApprovalClosed`` when it is no longer pending
        (decided, or expired: it is then marked expired).
        """
        _check_by(approval_id, by)
        record = await self._approval_record(approval_id)
        async with self._keys.hold(record.ident):
            record = await self._approval_record(approval_id)
            now = self.clock.now()
            if record.status is not EffectStatus.PENDING_APPROVAL:
                raise ApprovalClosed(approval_id, f"is {record.status.value}, not pending")
            if record.expires_at is not None and now >= record.expires_at:
                await self._expire(record)
                raise ApprovalClosed(
                    approval_id, f"expired at {record.expires_at.isoformat()}; it will not run"
                )
            record = await self.ledger.mark(
                *record.ident,
                EffectStatus.APPROVED,
                at=now,
                decided_by=by,
                decided_at=now,
                expires_at=now + timedelta(seconds=self.config.approval.expiry),
            )
        self._event(
            None,
            record.kind,
            record.key,
            "approved",
            agent=record.agent,
            approval_id=approval_id,
            by=by,
        )
        return ApprovalRequest.from_record(record)

    async def reject(self, approval_id: str, by: str, reason: str | None = None) -> ApprovalRequest:
        """Reject a pending or approved-but-not-run request; the effect never runs.

        Raises ``ApprovalNotFound`` and ``ApprovalClosed`` (it ran, or was already closed).
        """
        _check_by(approval_id, by)
        record = await self._approval_record(approval_id)
        async with self._keys.hold(record.ident):
            record = await self._approval_record(approval_id)
            if record.status not in (EffectStatus.PENDING_APPROVAL, EffectStatus.APPROVED):
                raise ApprovalClosed(approval_id, f"is {record.status.value}; nothing to reject")
            now = self.clock.now()
            record = await self.ledger.mark(
                *record.ident,
                EffectStatus.REJECTED,
                at=now,
                decided_by=by,
                decided_at=now,
                note=reason or "rejected",
            )
        self._event(
            None,
            record.kind,
            record.key,
            "rejected",
            agent=record.agent,
            approval_id=approval_id,
            by=by,
        )
        return ApprovalRequest.from_record(record)

    async def expire_due(self) -> list[ApprovalRequest]:
        """Mark every request past its expiry (pending, or approved and not run) expired."""
        now = self.clock.now()
        expired: list[ApprovalRequest] = []
        for status in (EffectStatus.PENDING_APPROVAL, EffectStatus.APPROVED):
            for record in await self.ledger.list(status=status):
                if record.expires_at is None or now < record.expires_at:
                    continue
                async with self._keys.hold(record.ident):
                    current = await self.ledger.get(*record.ident)
                    if current is None or current.status is not status:
                        continue
                    expired.append(ApprovalRequest.from_record(await self._expire(current)))
        return expired

    async def resolve(
        self, agent: str, kind: str, key: str, *, happened: bool, by: str, note: str | None = None
    ) -> EffectRecord:
        """A human settles a held effect: ``unknown`` -> ``done``/``failed``, or an output
        check failure -> ``done`` (accepted as is) / ``rolled_back`` (undone by hand).

        Raises ``EffectNotFound`` and ``InvalidTransition`` for any other status.
        """
        if not by:
            raise ValueError("resolve needs the name of who decided")
        async with self._keys.hold((agent, kind, key)):
            record = await self.ledger.get(agent, kind, key)
            if record is None:
                raise EffectNotFound(f"agent {agent!r} has no effect {kind}:{key!r}")
            held = record.status in (EffectStatus.UNKNOWN, EffectStatus.INTENT)
            if held:
                status = EffectStatus.DONE if happened else EffectStatus.FAILED
            elif record.status is EffectStatus.CHECK_FAILED:
                status = EffectStatus.DONE if happened else EffectStatus.ROLLED_BACK
            else:
                raise InvalidTransition(
                    f"agent {agent!r} effect {kind}:{key!r} is {record.status.value}: "
                    "only unknown and check_failed effects are resolved by hand"
                )
            now = self.clock.now()
            text = f"resolved by {by}: {'happened' if happened else 'did not happen'}"
            record = await self.ledger.mark(
                agent,
                kind,
                key,
                status,
                at=now,
                done_at=now,
                note=f"{text}; {note}" if note else text,
            )
        self._event(None, kind, key, "resolved", agent=agent, by=by, status=status.value)
        return record

    # -- shared with the run path ------------------------------------------------------------

    async def _expire(self, record: EffectRecord) -> EffectRecord:
        expired = await self.ledger.mark(
            *record.ident,
            EffectStatus.EXPIRED,
            at=self.clock.now(),
            note=f"approval {record.approval_id} expired",
        )
        self._event(
            None,
            record.kind,
            record.key,
            "expired",
            agent=record.agent,
            approval_id=record.approval_id,
        )
        return expired

    async def _approval_record(self, approval_id: str) -> EffectRecord:
        record = await self.ledger.find_approval(approval_id)
        if record is None or record.approval_id != approval_id:
            raise ApprovalNotFound(approval_id, "no such approval request")
        return record

    async def _new_approval_id(self) -> str:
        while True:
            candidate = secrets.token_hex(6)
            if await self.ledger.find_approval(candidate) is None:
                return candidate


def _check_by(approval_id: str, by: str) -> None:
    if not by:
        raise ValueError(f"approval {approval_id}: a decision needs the name of who made it")
