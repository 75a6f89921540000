"""The ``llm:`` section of the config: providers, models and prices, aliases, budgets.

Validated with the rest of the config (file:line errors); API keys are named here by secret
name only and resolved from the secrets the environment or ``$CREDENTIALS_DIRECTORY`` gave.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from supervisor.durations import Duration


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutsConfig(_Model):
    """Per-phase HTTP timeouts; ``read`` is also the longest idle gap allowed in a stream."""

    connect: Duration = Field(default=5.0, gt=0)
    read: Duration = Field(default=60.0, gt=0)
    write: Duration = Field(default=10.0, gt=0)
    pool: Duration = Field(default=5.0, gt=0)


class CallRetryConfig(_Model):
    """Call-level retry of transient provider errors (408, 409, 429, 5xx, connect/read)."""

    attempts: int = Field(default=3, ge=1, le=20)
    base_delay: Duration = Field(default=0.5, ge=0)
    max_delay: Duration = Field(default=20.0, ge=0)
    #: a Retry-After longer than this makes the tier fail over instead of waiting
    max_wait: Duration = Field(default=60.0, ge=0)


class BreakerConfig(_Model):
    """Circuit breaker per provider/model."""

    failures: int = Field(default=5, ge=0)
    cooldown: Duration = Field(default=60.0, gt=0)


class SecretRef(_Model):
    """A reference to a secret by name; the value never appears in YAML."""

    secret: str = Field(pattern=r"^[A-Za-z0-9_]+$")


class ProviderConfig(_Model):
    """One API endpoint."""

    kind: Literal["openai", "anthropic"] = "openai"
    base_url: str
    #: where the API key comes from: ``{secret: NAME}`` names a secret given by the
    #: environment (``AGENT_SUPERVISOR_SECRETS__<NAME>``) or ``$CREDENTIALS_DIRECTORY/<name>``;
    #: leave unset for local servers that need no key
    api_key: SecretRef | None = None
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    max_connections: int = Field(default=64, ge=1)
    #: requests per minute and tokens per minute, shared by every agent (0 = unlimited)
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    retry: CallRetryConfig = Field(default_factory=CallRetryConfig)
    circuit: BreakerConfig = Field(default_factory=BreakerConfig)
    #: stream responses (SSE); usage is still collected
    stream: bool = False
    #: send an Idempotency-Key header (for providers/gateways that honour it)
    idempotency_header: bool = False

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


class PriceConfig(_Model):
    """USD per 1 million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


class ModelConfig(_Model):
    """A model at a provider: its context window and price (overrides the bundled table)."""

    context: int | None = Field(default=None, ge=256)
    price: PriceConfig | None = None
    #: largest max_tokens this model accepts
    max_output: int | None = Field(default=None, ge=1)


class LimitConfig(_Model):
    """A spend limit: USD and/or tokens (unset = no limit on that measure)."""

    usd: float | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)


class BudgetsConfig(_Model):
    """Spend limits; a call whose worst case does not fit any of them is refused."""

    per_run: LimitConfig = Field(default_factory=LimitConfig)
    per_agent_day: LimitConfig = Field(default_factory=LimitConfig)
    global_hour: LimitConfig = Field(default_factory=LimitConfig)
    global_day: LimitConfig = Field(default_factory=LimitConfig)


class CacheConfig(_Model):
    """Exact-match response cache under the state dir."""

    enabled: bool = False
    ttl: Duration = Field(default=3600.0, gt=0)
    max_entries: int = Field(default=10_000, ge=1)


class ContextConfig(_Model):
    """What to do with messages that would not fit the model's context window."""

    strategy: Literal["drop_middle", "truncate_oldest", "refuse"] = "drop_middle"
    #: after a timeout, retry once with the context cut to this fraction
    shrink_on_timeout: float = Field(default=0.5, gt=0, le=1)


class LLMConfig(_Model):
    """The whole ``llm:`` section."""

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    #: ``provider/model`` -> context and price overrides
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    #: alias -> ordered chain of ``provider/model`` (the degradation ladder)
    aliases: dict[str, list[str]] = Field(default_factory=dict)
    default_max_tokens: int = Field(default=1024, ge=1)
    #: call models with no price at all (their cost counts as 0: only token limits apply)
    allow_unpriced: bool = False
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    #: log request/response bodies (truncated, redacted); off by default
    log_bodies: bool = False
    log_body_limit: int = Field(default=2000, ge=0)

    @field_validator("models")
    @classmethod
    def _model_refs(
        cls, value: dict[str, ModelConfig], info: ValidationInfo
    ) -> dict[str, ModelConfig]:
        providers = info.data.get("providers", {})
        for ref in value:
            provider, sep, model = ref.partition("/")
            if not sep or not model or provider not in providers:
                raise ValueError(f"{ref!r} does not name a configured provider as 'provider/model'")
        return value

    @field_validator("aliases")
    @classmethod
    def _alias_refs(cls, value: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        providers = info.data.get("providers", {})
        for alias, chain in value.items():
            if not chain:
                raise ValueError(f"alias {alias!r} has an empty chain")
            for ref in chain:
                provider, sep, model = ref.partition("/")
                if not sep or not model:
                    raise ValueError(f"alias {alias!r}: {ref!r} is not 'provider/model'")
                if provider not in providers:
                    raise ValueError(f"alias {alias!r}: unknown provider {provider!r}")
        return value


class AgentLLMConfig(_Model):
    """Per-agent LLM settings: least privilege and tighter budgets."""

    #: aliases this agent may use (None = all)
    aliases: list[str] | None = None
    per_run: LimitConfig | None = None
    per_agent_day: LimitConfig | None = None
