"""Webhook notifications of approval requests (generic JSON, or a Slack-compatible body)."""

from __future__ import annotations

from typing import Any

import httpx2

from supervisor.effects.approvals import ApprovalRequest, Notifier
from supervisor.logging import get_logger

_log = get_logger()


def slack_text(request: ApprovalRequest) -> str:
    """One readable message: what will be done, why, and how to decide."""
    doc = request.to_dict()
    lines = [
        f":warning: *{doc['agent']}* wants to perform a high-risk *{doc['kind']}* "
        f"(key `{doc['key']}`)",
    ]
    if doc.get("reason"):
        lines.append(f"why: {doc['reason']}")
    lines.append(f"expires: {doc['expires_at']}")
    lines.append(f"approve: `{doc['approve']}`   reject: `{doc['reject']}`")
    return "\n".join(lines)


def webhook_notifier(url: str, fmt: str = "generic", timeout: float = 10.0) -> Notifier:
    """A notifier POSTing each new approval request to ``url``.

    The caller bounds each call (``notify_timeout``); a failure is logged by the caller.
    """

    async def notify(request: ApprovalRequest) -> None:
        body: dict[str, Any] = (
            {"text": slack_text(request)} if fmt == "slack" else request.to_dict()
        )
        async with httpx2.AsyncClient(timeout=timeout) as client:
            response = await client.post(url, json=body)
        if response.status_code >= 300:
            _log.warning("approval.notify_failed", approval=request.id, status=response.status_code)
            response.raise_for_status()

    return notify
