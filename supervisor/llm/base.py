"""Types shared by every part of the LLM layer, and the ``Provider`` protocol.

    agent -> ctx.llm.complete(alias, messages, ...)          (supervisor.llm.client)
          -> for each tier of the alias's chain: breaker, rate limit, budget reservation
          -> Provider.complete(ChatRequest) over httpx2       (supervisor.llm.providers.*)
          -> ChatResponse with Usage -> budget settlement, metrics, one log line per attempt

Providers translate httpx2 errors and HTTP statuses into ``ProviderError`` subclasses once, at
the I/O boundary; nothing above them sees an httpx2 exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: Role
    content: str

    @classmethod
    def coerce(cls, value: Message | Mapping[str, Any]) -> Message:
        """Accept ``Message`` or an OpenAI-style ``{"role": ..., "content": ...}`` dict.

        Raises ``ValueError`` for anything else.
        """
        if isinstance(value, Message):
            return value
        role, content = value.get("role"), value.get("content")
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise ValueError(f"not a chat message: {value!r}")
        return cls(role, content)


def coerce_messages(messages: Sequence[Message | Mapping[str, Any]]) -> tuple[Message, ...]:
    """Normalise a message list. Raises ``ValueError`` when empty or malformed."""
    out = tuple(Message.coerce(m) for m in messages)
    if not out:
        raise ValueError("messages must not be empty")
    return out


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What is sent to one provider for one attempt."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float | None = None
    stream: bool = False
    #: ask for a JSON object (OpenAI ``response_format``); Anthropic ignores it
    json_mode: bool = False
    #: sent as the ``Idempotency-Key`` header where supported
    idempotency_key: str | None = None
    #: provider-specific parameters passed through unchanged
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the provider reported for one call."""

    input_tokens: int
    output_tokens: int
    #: input tokens served from the provider's prompt cache (billed at the cached price)
    cached_input_tokens: int = 0
    #: output tokens spent on hidden reasoning (already included in ``output_tokens``)
    reasoning_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """What one provider call returned."""

    text: str
    model: str
    #: None when the provider did not report usage (the call is then flagged)
    usage: Usage | None
    finish_reason: str | None = None
    response_id: str | None = None


@runtime_checkable
class Provider(Protocol):
    """One LLM API endpoint (a base URL and a key) over one shared HTTP client."""

    #: the provider's name in config (``groq``, ``anthropic``, ``local``)
    name: str

    async def complete(self, request: ChatRequest) -> ChatResponse:
        """Send one request (streamed or not) and return the whole answer.

        Raises ``ProviderError`` subclasses only (see ``supervisor.errors``).
        """
        ...

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        ...
