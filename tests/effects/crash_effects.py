"""Helper for ``test_crash.py``: perform effects against a receipt-keeping target until killed.

Run as ``python -m tests.effects.crash_effects <dir> <keys>``. It opens the JSON-lines ledger
in ``<dir>/effects``, prints ``ready``, then asks for effect ``post:k<i>`` for every i in
order, printing ``done k<i>`` after each returns (``held k<i>`` when it is held). The target
appends ``k<i>`` to ``<dir>/receipts`` (the platform received the post) and then sleeps a
little before answering, so kills often land between the receipt and the recorded result.
Even keys have a ``reconcile`` that reads the receipts; odd keys have none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import anyio

from supervisor.clock import SystemClock
from supervisor.context import RunContext
from supervisor.effects import EffectHeld, EffectsService, JsonlLedger
from supervisor.guards.steps import StepCounter


def receipts(directory: Path) -> list[str]:
    """Every post the target received, in order (a torn last line is not a receipt)."""
    try:
        raw = (directory / "receipts").read_bytes()
    except FileNotFoundError:
        return []
    return [line.decode() for line in raw.split(b"\n")[:-1]]


async def main(directory: Path, keys: int) -> None:
    clock = SystemClock()
    ledger = JsonlLedger(directory / "effects", clock=clock, compact_bytes=8192)
    await ledger.open()
    service = EffectsService(ledger, clock)
    ctx = RunContext(
        agent="crashy",
        run_id=f"pid-{os.getpid()}",
        state={},
        steps=StepCounter(None),
        clock=clock,
        log=None,
        services={"effects": service},
        config=SimpleNamespace(effects=None),
    )
    receipt_fd = os.open(directory / "receipts", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    print("ready", flush=True)
    for i in range(keys):
        key = f"k{i}"

        async def post(ik: str, key: str = key) -> str:
            os.write(receipt_fd, f"{key}\n".encode())
            await anyio.sleep(0.002)
            return key

        async def reconcile(key: str = key) -> bool:
            return key in receipts(directory)

        try:
            await ctx.effect("post", key, post, reconcile=reconcile if i % 2 == 0 else None)
        except EffectHeld:
            print(f"held {key}", flush=True)
            continue
        print(f"done {key}", flush=True)
    await ledger.close()
    print("finished", flush=True)


if __name__ == "__main__":
    import structlog

    # Quiet: the parent reads stdout line by line.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    anyio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
