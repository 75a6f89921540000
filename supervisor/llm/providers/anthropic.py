"""Anthropic Messages.

Request: ``POST {base_url}/v1/messages`` (``base_url`` as the Anthropic SDK spells it,
``https://api.anthropic.com``; one ending in ``/v1`` works too) with ``x-api-key`` and
``anthropic-version: 2023-06-01``. System messages are joined with blank lines into
``system``; ``tool`` messages are sent as ``user`` (there is no plain-text tool role);
``json_mode`` has no Anthropic equivalent and is ignored; ``request.extra`` is merged on top.

Usage: Anthropic's ``input_tokens`` counts only the uncached, uncache-written part of the
prompt. So that cost is right, ``Usage.input_tokens`` is the whole prompt::

    input_tokens        = input_tokens + cache_read_input_tokens + cache_creation_input_tokens
    cached_input_tokens = cache_read_input_tokens      (billed at the cached price)
    output_tokens       = output_tokens

Cache writes are counted as ordinary input (Anthropic bills them at 1.25x the input price, so
cost is slightly under-estimated for them). In a stream, input counts come from
``message_start`` and the output count from the last ``message_delta``; a later event's
count replaces an earlier one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2

from supervisor.clock import Clock
from supervisor.errors import MalformedResponse, ProviderStatusError
from supervisor.llm.base import ChatRequest, ChatResponse, Usage
from supervisor.llm.config import ProviderConfig
from supervisor.llm.providers.base import HttpProvider, SSEEvent, as_int, parse_json, redact

__all__ = ["ANTHROPIC_VERSION", "AnthropicProvider"]

ANTHROPIC_VERSION = "2023-06-01"

# Error types an Anthropic stream may end with, as the HTTP status they stand for.
_STREAM_ERRORS = {
    "overloaded_error": 529,
    "api_error": 500,
    "rate_limit_error": 429,
    "timeout_error": 504,
}


class AnthropicProvider(HttpProvider):
    """A provider speaking the Anthropic Messages wire format."""

    path = "/v1/messages"

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        api_key: str | None,
        clock: Clock,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(name, config, api_key, clock, transport=transport)
        if config.base_url.endswith("/v1"):
            self.path = "/messages"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        system = [m.content for m in request.messages if m.role == "system"]
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [
                {"role": "assistant" if m.role == "assistant" else "user", "content": m.content}
                for m in request.messages
                if m.role != "system"
            ],
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        body.update(request.extra)
        body.pop("stream", None)
        if stream:
            body["stream"] = True
        return body

    def parse_body(self, data: Any, request: ChatRequest) -> ChatResponse:
        if not isinstance(data, Mapping):
            raise MalformedResponse(self.name, "body is not a JSON object")
        content = data.get("content")
        if not isinstance(content, list):
            raise MalformedResponse(self.name, "body has no content list")
        return ChatResponse(
            text=_text(content),
            model=_str(data.get("model")) or request.model,
            usage=_usage(data.get("usage"), None),
            finish_reason=_str(data.get("stop_reason")),
            response_id=_str(data.get("id")),
        )

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], request: ChatRequest
    ) -> ChatResponse:
        parts: list[str] = []
        usage: Mapping[str, Any] | None = None
        delta_usage: Mapping[str, Any] | None = None
        finish: str | None = None
        response_id: str | None = None
        model: str | None = None
        started = stopped = False
        async for event in events:
            data = parse_json(event.data.encode(), self.name, (self._api_key,))
            if not isinstance(data, Mapping):
                raise MalformedResponse(self.name, "stream event is not a JSON object")
            kind = data.get("type") or event.event
            if kind == "message_start":
                message = data.get("message")
                if not isinstance(message, Mapping):
                    raise MalformedResponse(self.name, "message_start without a message")
                started = True
                response_id, model = _str(message.get("id")), _str(message.get("model"))
                raw = message.get("usage")
                usage = raw if isinstance(raw, Mapping) else None
            elif kind == "content_block_delta":
                delta = data.get("delta")
                if isinstance(delta, Mapping) and delta.get("type") == "text_delta":
                    text = delta.get("text")
                    parts.append(text if isinstance(text, str) else "")
            elif kind == "message_delta":
                delta = data.get("delta")
                if isinstance(delta, Mapping):
                    finish = _str(delta.get("stop_reason")) or finish
                raw = data.get("usage")
                delta_usage = raw if isinstance(raw, Mapping) else delta_usage
            elif kind == "message_stop":
                stopped = True
                break
            elif kind == "error":
                raise self._stream_error(data.get("error"))
        if not started or not stopped:
            raise MalformedResponse(self.name, "stream ended before message_stop")
        return ChatResponse(
            text="".join(parts),
            model=model or request.model,
            usage=_usage(usage, delta_usage),
            finish_reason=finish,
            response_id=response_id,
        )

    def _stream_error(self, error: Any) -> ProviderStatusError:
        kind = _str(error.get("type")) if isinstance(error, Mapping) else None
        detail = error.get("message") if isinstance(error, Mapping) else error
        status = _STREAM_ERRORS.get(kind or "")
        text = redact(f"{kind}: {detail}", (self._api_key,))[:300]
        return ProviderStatusError(
            self.name, f"error in stream: {text}", status=status, transient=status is not None
        )


def _text(content: list[Any]) -> str:
    return "".join(
        block["text"]
        for block in content
        if isinstance(block, Mapping)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    )


def _usage(start: Mapping[str, Any] | None, delta: Mapping[str, Any] | None) -> Usage | None:
    """Usage from the message (or ``message_start``) usage, updated by ``message_delta``'s."""
    merged = {**(start or {}), **(delta or {})}
    uncached, output = as_int(merged.get("input_tokens")), as_int(merged.get("output_tokens"))
    if uncached is None or output is None:
        return None
    read = as_int(merged.get("cache_read_input_tokens")) or 0
    written = as_int(merged.get("cache_creation_input_tokens")) or 0
    return Usage(
        input_tokens=uncached + read + written,
        output_tokens=output,
        cached_input_tokens=read,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
