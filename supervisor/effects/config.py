"""Config of the side-effects layer: the top-level ``effects:`` section and each agent's.

    effects:                      # top level: every agent
      approval:
        expiry: 24h               # decide within; an approved effect must run within too
        notify_timeout: 10s
      ledger:
        compact_bytes: 4194304
      max_result_bytes: 65536     # results larger than this are recorded without the value
      kinds:
        post: {rate: 5/day, high_risk: false}
        payment: {high_risk: true}

    agents:
      - name: publisher
        effects:
          allow: [post]           # least privilege: omitted = every kind, [] = none
          kinds:
            post: {rate: 2/day}   # overrides the top-level entry field by field

Rate limits are sliding windows per agent and kind: ``N/<window>`` allows at most N effects
of the kind whose start lies in the last window. The window is a duration with an optional
count: ``5/day``, ``1/10min``, ``100/h``, ``3/2h``, ``10/30s``, ``7/week``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from supervisor.durations import Duration

__all__ = [
    "AgentEffectsConfig",
    "ApprovalConfig",
    "EffectKindConfig",
    "EffectsConfig",
    "KindPolicy",
    "LedgerConfig",
    "RateLimit",
    "RateLimitField",
    "parse_rate",
    "resolve_policy",
]

_UNIT_SECONDS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "weeks": 604800.0,
}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([A-Za-z]+)\s*")
#: effect kinds are metric labels and file-safe words
KIND_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` effects per sliding window of ``window`` seconds."""

    count: int
    window: float
    #: the text it was parsed from, for messages
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(value: Any) -> RateLimit:
    """A ``RateLimit`` from ``"5/day"``, ``"1/10min"`` and the like (or a ``RateLimit``).

    Raises ``ValueError`` for anything else, a count below 1 or a zero window.
    """
    if isinstance(value, RateLimit):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a rate such as 5/day or 1/10min, got {value!r}")
    m = _RATE.fullmatch(value)
    unit = m.group(3).lower() if m else ""
    if m is None or unit not in _UNIT_SECONDS:
        raise ValueError(
            f"invalid rate {value!r}: use N/<window>, e.g. 5/day, 1/10min, 100/h, 3/2h"
        )
    count = int(m.group(1))
    window = float(m.group(2) or 1) * _UNIT_SECONDS[unit]
    if count < 1 or window <= 0:
        raise ValueError(f"invalid rate {value!r}: the count and the window must be > 0")
    return RateLimit(count, window, value.strip())


#: a config field holding a rate: parsed once, written back as its text
RateLimitField = Annotated[
    RateLimit, BeforeValidator(parse_rate), PlainSerializer(str, return_type=str)
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class EffectKindConfig(_Model):
    """Rules for one effect kind."""

    #: sliding-window limit per agent, e.g. ``5/day``; unset = no limit
    rate: RateLimitField | None = None
    #: every effect of this kind waits for a human's approval
    high_risk: bool = False


class ApprovalConfig(_Model):
    """Human approval of high-risk effects."""

    #: a pending request must be decided within this; an approved effect must run within
    #: this of the decision; otherwise it expires and never runs
    expiry: Duration = Field(default=86400.0, gt=0)
    #: the notifier (webhook) gets this long per request; a failure is logged, not fatal
    notify_timeout: Duration = Field(default=10.0, gt=0)
    #: where to POST each new approval request (unset: no notification; the CLI still works)
    webhook_url: str | None = None
    #: or: the name of a secret holding the URL (a Slack webhook URL is itself a credential)
    webhook_url_secret: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]+$")
    #: ``generic``: the request as JSON; ``slack``: a Slack-compatible ``{"text": ...}`` body
    webhook_format: Literal["generic", "slack"] = "generic"


class LedgerConfig(_Model):
    """The effect ledger's files."""

    #: a file larger than this, a quarter or more of it superseded lines, is compacted
    compact_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)


class EffectsConfig(_Model):
    """The top-level ``effects:`` section."""

    kinds: dict[Annotated[str, Field(pattern=KIND_PATTERN)], EffectKindConfig] = Field(
        default_factory=dict
    )
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    #: results larger than this (as JSON) are recorded as done without the value
    max_result_bytes: int = Field(default=64 * 1024, ge=0)


class AgentEffectsConfig(_Model):
    """An agent's ``effects:`` block."""

    #: the effect kinds this agent may perform; None (omitted) = any kind, [] = none
    allow: tuple[Annotated[str, Field(pattern=KIND_PATTERN)], ...] | None = None
    #: per-kind rules for this agent, overriding the top-level entry field by field
    kinds: dict[Annotated[str, Field(pattern=KIND_PATTERN)], EffectKindConfig] = Field(
        default_factory=dict
    )


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """The rules that apply to one agent's effects of one kind."""

    allowed: bool
    allow_list: tuple[str, ...] | None
    rate: RateLimit | None
    high_risk: bool


def resolve_policy(kind: str, top: EffectsConfig, agent: AgentEffectsConfig | None) -> KindPolicy:
    """Merge the top-level and the agent's rules for ``kind``."""
    base = top.kinds.get(kind) or EffectKindConfig()
    rate, high_risk = base.rate, base.high_risk
    allow: tuple[str, ...] | None = None
    if agent is not None:
        allow = agent.allow
        override = agent.kinds.get(kind)
        if override is not None:
            if "rate" in override.model_fields_set:
                rate = override.rate
            if "high_risk" in override.model_fields_set:
                high_risk = override.high_risk
    return KindPolicy(
        allowed=allow is None or kind in allow,
        allow_list=allow,
        rate=rate,
        high_risk=high_risk,
    )
