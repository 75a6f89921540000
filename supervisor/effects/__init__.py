"""Side effects exactly once: the ledger, the gatekeeper, human approval, least privilege.

EffectsService     the ``effects`` service behind ``ctx.effect`` (see its module docs
                   for the exact guarantee)
ledger/            EffectLedger protocol; JsonlLedger (default), MemoryLedger (tests)
config             the ``effects:`` config sections and rate-limit parsing
approvals          ApprovalRequest and the notifier seam
untrusted          ``untrusted(text)``: delimit and flag external text for prompts
errors             the error tree of this package
"""

from __future__ import annotations

from supervisor.effects.approvals import ApprovalRequest, Notifier
from supervisor.effects.calls import EffectCall, current_effect, idempotency_key
from supervisor.effects.config import (
    AgentEffectsConfig,
    ApprovalConfig,
    EffectKindConfig,
    EffectsConfig,
    LedgerConfig,
    RateLimit,
    parse_rate,
)
from supervisor.effects.errors import (
    ApprovalClosed,
    ApprovalError,
    ApprovalNotFound,
    ApprovalPending,
    EffectError,
    EffectHeld,
    EffectInvalidRequest,
    EffectNotAllowed,
    EffectNotFound,
    EffectNotStarted,
    EffectParamsChanged,
    EffectParamsInvalid,
    EffectRateLimited,
    EffectRefused,
    EffectRejected,
    InvalidTransition,
    LedgerCorruptError,
    LedgerWriteError,
)
from supervisor.effects.ledger import (
    EffectLedger,
    EffectRecord,
    EffectStatus,
    JsonlLedger,
    MemoryLedger,
    open_ledger,
)
from supervisor.effects.service import EffectsMetrics, EffectsService
from supervisor.effects.untrusted import UntrustedText, untrusted

__all__ = [
    "AgentEffectsConfig",
    "ApprovalClosed",
    "ApprovalConfig",
    "ApprovalError",
    "ApprovalNotFound",
    "ApprovalPending",
    "ApprovalRequest",
    "EffectCall",
    "EffectError",
    "EffectHeld",
    "EffectInvalidRequest",
    "EffectKindConfig",
    "EffectLedger",
    "EffectNotAllowed",
    "EffectNotFound",
    "EffectNotStarted",
    "EffectParamsChanged",
    "EffectParamsInvalid",
    "EffectRateLimited",
    "EffectRecord",
    "EffectRefused",
    "EffectRejected",
    "EffectStatus",
    "EffectsConfig",
    "EffectsMetrics",
    "EffectsService",
    "InvalidTransition",
    "JsonlLedger",
    "LedgerConfig",
    "LedgerCorruptError",
    "LedgerWriteError",
    "MemoryLedger",
    "Notifier",
    "RateLimit",
    "UntrustedText",
    "current_effect",
    "idempotency_key",
    "open_ledger",
    "parse_rate",
    "untrusted",
]
