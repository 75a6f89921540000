"""Overhead of the loop and stall detectors per step and per call (issue target: <= 5 us).

    .venv/bin/python -m tests.bench.bench_loops            # print the section
    .venv/bin/python -m tests.bench.bench_loops --write    # and put it into docs/performance.md

Measured in one process as the difference to the same operation with every detector off
(``LoopPolicy.disabled()``), best of 7 repeats, over several rounds: median and spread.
"""

from __future__ import annotations

import argparse
import re
import statistics
import timeit
from collections.abc import Callable
from datetime import UTC, datetime

from supervisor.clock import SystemClock
from supervisor.guards.loops import LoopGuards, LoopPolicy, fingerprint
from tests.bench._common import REPO

DOC = REPO / "docs" / "performance.md"
HEADING = "## Loop and stall detectors"
N = 50_000


def _best(fn: Callable[[], object], n: int = N) -> float:
    return min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6


def _cases() -> dict[str, tuple[Callable[[LoopGuards], Callable[[], object]], str]]:
    state = {"cursor": 1, "items": [{"id": i, "score": i * 0.5} for i in range(10)]}
    names = iter(f"step-{i}" for i in range(10**8))
    responses = iter(f"{i:016x}" for i in range(10**8))

    def step_new_name(g: LoopGuards) -> Callable[[], object]:
        return lambda: g.on_step(next(names), state)

    def step_spin(g: LoopGuards) -> Callable[[], object]:
        return lambda: g.on_step("spin", state)

    requests = iter(f"{i:016x}" for i in range(10**8))

    def llm_call(g: LoopGuards) -> Callable[[], object]:
        def call() -> None:
            fp = next(requests)
            g.before_call("llm", fp)
            g.after_call("llm", fp, "fedcba9876543210")

        return call

    def http_poll(g: LoopGuards) -> Callable[[], object]:
        def call() -> None:
            g.before_call("http", "0123456789abcdef")
            g.after_call("http", "0123456789abcdef", next(responses))

        return call

    return {
        "step, new name each time (0.3 KB state)": (step_new_name, "step"),
        "step, same name (idle spin, 0.3 KB state)": (step_spin, "step"),
        "LLM call, a new request each time (before + after)": (llm_call, "call"),
        "HTTP poll, new response each time": (http_poll, "call"),
    }


def measure(rounds: int) -> list[tuple[str, str, float, float, float]]:
    clock = SystemClock()
    out = []
    for label, (make, unit) in _cases().items():
        deltas = []
        for _ in range(rounds):
            on = _best(make(LoopGuards(LoopPolicy(), clock)))
            off = _best(make(LoopGuards(LoopPolicy.disabled(), clock)))
            deltas.append(on - off)
        deltas.sort()
        out.append((label, unit, statistics.median(deltas), deltas[0], deltas[-1]))
    msgs = [["system", "You are terse."], ["user", "Summarise: " + "x" * 200]]
    fps = sorted(
        _best(lambda: fingerprint("fast", msgs, 512, 0.2, None, {}), 20_000) for _ in range(rounds)
    )
    out.append(
        ("fingerprint of an LLM request (0.3 KB)", "call", statistics.median(fps), fps[0], fps[-1])
    )
    return out


def section(rows: list[tuple[str, str, float, float, float]], rounds: int) -> str:
    worst = max(r[2] for r in rows if not r[0].startswith("fingerprint"))
    per_call = sum(r[2] for r in rows if r[0].startswith(("LLM", "fingerprint")))
    lines = [
        HEADING,
        "",
        "```sh",
        ".venv/bin/python -m tests.bench.bench_loops --write",
        "```",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {rounds} rounds. Added cost of the "
        "default detectors (repeat enforce, no_progress warn, stall warn) over the same "
        "operation with every detector off, best of 7 repeats per round; median (min-max) "
        "over the rounds. Target: at most 5 µs per step and per call.",
        "",
        "| operation | added per operation |",
        "|---|---|",
    ]
    lines += [f"| {label} | {m:.2f} µs ({lo:.2f}-{hi:.2f}) |" for label, _, m, lo, hi in rows]
    verdict = "pass" if max(worst, per_call) <= 5.0 else "**MISS**"
    lines += [
        "",
        f"Worst per step or call: {worst:.2f} µs; an LLM call including its fingerprint: "
        f"{per_call:.2f} µs. Verdict: {verdict}. Cost grows with the size of the state "
        "(no_progress compares it as JSON every `max_idle_steps` idle steps) and of hashed "
        "bodies.",
        "",
    ]
    return "\n".join(lines)


def write(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(text + "\n", doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + text
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    text = section(measure(args.rounds), args.rounds)
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
