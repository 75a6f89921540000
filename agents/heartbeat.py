"""heartbeat: the smallest useful agent. It proves the fleet is alive and shows the contract.

Each run counts itself in ``ctx.state`` and, every ``report_every`` runs, logs a summary line.
It needs no network and no API key, so the bundled example config runs it anywhere.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from supervisor import RunContext


class HeartbeatParams(BaseModel):
    """Params of the heartbeat agent."""

    message: str = "alive"
    report_every: int = Field(default=10, ge=1)


async def heartbeat(ctx: RunContext, params: HeartbeatParams) -> dict[str, object]:
    """Count this run; return the count and the message."""
    with ctx.step("beat"):
        beats = int(ctx.state.get("beats", 0)) + 1
        ctx.state["beats"] = beats
        ctx.partial({"beats": beats})
    if beats % params.report_every == 0:
        ctx.log.info("heartbeat.report", beats=beats, message=params.message)
    return {"beats": beats, "message": params.message}
