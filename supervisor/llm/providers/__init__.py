"""LLM providers: one module per wire format, sharing ``base.HttpProvider``.

``build_provider`` picks the implementation from ``ProviderConfig.kind``.
"""

from __future__ import annotations

import httpx2

from supervisor.clock import Clock
from supervisor.llm.base import Provider
from supervisor.llm.config import ProviderConfig
from supervisor.llm.providers.anthropic import AnthropicProvider
from supervisor.llm.providers.base import HttpProvider
from supervisor.llm.providers.openai import OpenAIProvider

__all__ = ["AnthropicProvider", "HttpProvider", "OpenAIProvider", "build_provider"]

_KINDS: dict[str, type[HttpProvider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}


def build_provider(
    name: str,
    config: ProviderConfig,
    api_key: str | None,
    clock: Clock,
    *,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> Provider:
    """The provider for ``config.kind``. Raises ``ValueError`` for an unknown kind.

    ``transport`` replaces the network (``httpx2.MockTransport`` in unit tests).
    """
    try:
        cls = _KINDS[config.kind]
    except KeyError:
        raise ValueError(f"provider {name!r}: unknown kind {config.kind!r}") from None
    return cls(name, config, api_key, clock, transport=transport)
