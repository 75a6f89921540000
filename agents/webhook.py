"""The ``webhook`` effect the analyst and the digest share: one Slack-compatible message."""

from __future__ import annotations

from typing import Any

import httpx2

from supervisor import EffectNotStarted, RunContext


async def post_webhook(ctx: RunContext, url: str, text: str, idempotency_key: str) -> Any:
    """POST ``{"text": text}`` to ``url`` through ``ctx.http``.

    Raises ``EffectNotStarted`` when the message was certainly not delivered (no connection,
    or the receiver answered that it took nothing).
    """
    try:
        response = await ctx.http.post(url, json={"text": text})
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
        raise EffectNotStarted(f"POST {url}: {exc}") from exc
    if response.status_code >= 400:
        raise EffectNotStarted(f"POST {url}: HTTP {response.status_code}")
    return {"status": response.status_code}
