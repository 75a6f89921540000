"""An agent module that takes seconds to import, so the daemon's start takes that long.

The systemd boot test uses it to see the unit stay ``activating`` until the daemon says
``READY=1``: agents are imported while the config is loaded, before the daemon is ready.
"""

from __future__ import annotations

import time

from supervisor import RunContext

IMPORT_SECONDS = 4.0
time.sleep(IMPORT_SECONDS)


async def ok(ctx: RunContext) -> str:
    ctx.step("ok")
    return "ok"
