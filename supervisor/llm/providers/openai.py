"""OpenAI Chat Completions, and every server that copies it (Groq, vLLM, llama.cpp, ...).

Request: ``POST {base_url}/chat/completions`` with ``Authorization: Bearer <key>`` (omitted
when no key is configured) and ``model``, ``messages``, ``max_tokens``, ``temperature`` when
set, ``response_format: {"type": "json_object"}`` in JSON mode, ``stream`` with
``stream_options: {"include_usage": true}`` when streaming, then ``request.extra`` merged on
top. When ``extra`` has ``max_completion_tokens`` (newer OpenAI models), ``max_tokens`` is
dropped; ``extra`` cannot switch streaming on or off.

Usage: ``prompt_tokens`` (already includes the cached part) -> ``input_tokens``,
``prompt_tokens_details.cached_tokens`` -> ``cached_input_tokens``, ``completion_tokens``
(already includes reasoning) -> ``output_tokens``,
``completion_tokens_details.reasoning_tokens`` -> ``reasoning_tokens``. Groq reports stream
usage under ``x_groq.usage``; that is read too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from supervisor.errors import MalformedResponse, ProviderStatusError
from supervisor.llm.base import ChatRequest, ChatResponse, Usage
from supervisor.llm.providers.base import HttpProvider, SSEEvent, as_int, parse_json, redact

__all__ = ["OpenAIProvider"]


class OpenAIProvider(HttpProvider):
    """A provider speaking the OpenAI Chat Completions wire format."""

    path = "/chat/completions"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(request.extra)
        if "max_completion_tokens" in request.extra:
            body.pop("max_tokens", None)
        # the parser must match what was asked for, whatever ``extra`` says
        body.pop("stream", None)
        if stream:
            body["stream"] = True
        else:
            body.pop("stream_options", None)
        return body

    def parse_body(self, data: Any, request: ChatRequest) -> ChatResponse:
        if not isinstance(data, Mapping):
            raise MalformedResponse(self.name, "body is not a JSON object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            raise MalformedResponse(self.name, "body has no choices")
        message = choices[0].get("message")
        if not isinstance(message, Mapping):
            raise MalformedResponse(self.name, "first choice has no message")
        return ChatResponse(
            text=_content(message.get("content"), self.name),
            model=_str(data.get("model")) or request.model,
            usage=_usage(data.get("usage")),
            finish_reason=_str(choices[0].get("finish_reason")),
            response_id=_str(data.get("id")),
        )

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], request: ChatRequest
    ) -> ChatResponse:
        parts: list[str] = []
        usage: Usage | None = None
        finish: str | None = None
        response_id: str | None = None
        model: str | None = None
        done = False
        async for event in events:
            if event.data.strip() == "[DONE]":
                done = True
                break
            chunk = parse_json(event.data.encode(), self.name, (self._api_key,))
            if not isinstance(chunk, Mapping):
                raise MalformedResponse(self.name, "stream chunk is not a JSON object")
            if "error" in chunk:
                raise self._stream_error(chunk["error"])
            response_id = response_id or _str(chunk.get("id"))
            model = model or _str(chunk.get("model"))
            groq = chunk.get("x_groq")
            usage = (
                _usage(chunk.get("usage"))
                or _usage(groq.get("usage") if isinstance(groq, Mapping) else None)
                or usage
            )
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                if isinstance(delta, Mapping) and delta.get("content") is not None:
                    parts.append(_content(delta.get("content"), self.name))
                finish = _str(choice.get("finish_reason")) or finish
        if not done and finish is None:
            raise MalformedResponse(self.name, "stream ended before [DONE]")
        return ChatResponse(
            text="".join(parts),
            model=model or request.model,
            usage=usage,
            finish_reason=finish,
            response_id=response_id,
        )

    def _stream_error(self, error: Any) -> ProviderStatusError:
        # An error after a 200 means the server failed mid-answer: worth another try.
        detail = error.get("message") if isinstance(error, Mapping) else error
        text = redact(str(detail), (self._api_key,))[:300]
        return ProviderStatusError(self.name, f"error in stream: {text}", transient=True)


def _content(value: Any, provider: str) -> str:
    """Message content: a string, null (e.g. a refusal), or a list of text parts."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        return "".join(
            p["text"] for p in value if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    raise MalformedResponse(provider, f"unexpected content {orjson.dumps(value)[:80]!r}")


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    prompt, completion = as_int(raw.get("prompt_tokens")), as_int(raw.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    cached = (
        as_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else None
    )
    reasoning = (
        as_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, Mapping)
        else None
    )
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        cached_input_tokens=min(cached or 0, prompt),
        reasoning_tokens=min(reasoning or 0, completion),
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
