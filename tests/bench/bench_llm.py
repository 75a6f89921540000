"""Cost of a guarded LLM call: ``ctx.llm.complete`` against a raw httpx2 POST and the SDKs.

    .venv/bin/python -m tests.bench.bench_llm [--rounds 5] [--calls 400] [--write]

The fake LLM server (``supervisor.llm.fakeserver``) runs in a subprocess, so that the
process-wide CPU time measured here (``time.process_time``, every thread) is the client's
alone. Every variant sends the same Chat Completions body (one short user message,
``max_tokens`` 64) to the same server over loopback keep-alive connections, and parses the
JSON answer:

- ``httpx2 raw``: ``httpx2.AsyncClient.post`` of the body, ``orjson.loads`` of the answer
  (the baseline: what any client has to do);
- ``OpenAIProvider``: the supervisor's provider layer alone (``Provider.complete`` of a
  ``ChatRequest``: the body built, the same ``httpx2`` client, the answer parsed into
  ``ChatResponse``/``Usage``);
- ``ctx.llm[memory]`` / ``ctx.llm[json]``: ``ctx.llm.complete`` of one alias, through the
  whole guarded path (alias check, breaker, price, context fit, step, Retry-After gate,
  worst-case reservation, rate limiter, provider, settlement, metrics, the ``llm.call`` JSON
  line rendered to ``/dev/null``), with a global day budget set so every reservation is
  checked; the ledger is kept in a ``MemoryStore`` or in a ``JsonFileStore`` (a durable
  reservation: one fsync'd write per group commit);
- ``httpx 0.28 raw``: the same POST with httpx 0.28, the HTTP client of the SDKs below;
- ``openai``: ``AsyncOpenAI(...).chat.completions.create`` (max_retries 0);
- ``litellm``: ``litellm.acompletion(model="openai/...")``, local cost map, no callbacks.

The SDKs are benchmark-only dependencies: ``.venv/bin/pip install openai litellm``; a variant
whose package is missing is skipped and reported as such.

Each variant runs ``calls`` calls one after another (sequential) and ``calls`` calls with 32
in flight, in rounds that interleave the variants; per round and mode it yields CPU per call,
throughput and latency, and ratios to the baseline of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from tests.bench._common import PYTHON, REPO, Spread, package_versions, quantile, verdict

CONCURRENCY = 32
MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "Summarise in one line: the weekend bill was fine."}]
MAX_TOKENS = 64
BODY = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
KEY = "bench-key-not-secret"

RAW = "httpx2 raw"
PROVIDER = "OpenAIProvider"
MEMORY = "ctx.llm[memory]"
JSON = "ctx.llm[json]"
HTTPX = "httpx 0.28 raw"
OPENAI = "openai"
LITELLM = "litellm"
VARIANTS = (RAW, PROVIDER, MEMORY, JSON, HTTPX, OPENAI, LITELLM)
MODES = ("sequential", f"{CONCURRENCY} in flight")

CPU_TARGET = 1.3  # ctx.llm CPU per call ÷ raw httpx2, at most
OPENAI_TARGET = 2.0  # openai CPU per call ÷ ctx.llm, at least
LITELLM_TARGET = 4.0  # litellm CPU per call ÷ ctx.llm, at least

Call = Callable[[int], Awaitable[Any]]


@dataclass
class Sample:
    """One variant, one mode, one round."""

    cpu_per_call: float
    throughput: float
    p50: float
    p99: float


@dataclass
class LLMBenchResult:
    calls: int
    rounds: int
    #: variant -> mode -> one sample per round
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    #: variant -> why it was not measured
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    date: str = ""
    #: "<variant>, log <level>" -> CPU per call of the client path alone, one per round
    breakdown: dict[str, list[float]] = field(default_factory=dict)

    def measured(self) -> list[str]:
        return [v for v in VARIANTS if v in self.samples]

    def spread(self, variant: str, mode: str, attr: str) -> Spread:
        return Spread.of(getattr(s, attr) for s in self.samples[variant][mode])

    def ratio(self, variant: str, base: str, mode: str, attr: str = "cpu_per_call") -> Spread:
        """Per-round ratio ``variant / base`` of ``attr``."""
        pairs = zip(self.samples[variant][mode], self.samples[base][mode], strict=True)
        return Spread.of(getattr(v, attr) / getattr(b, attr) for v, b in pairs)

    def scaling(self, variant: str) -> Spread:
        """Per-round throughput at 32 in flight ÷ sequential throughput."""
        seq, par = self.samples[variant][MODES[0]], self.samples[variant][MODES[1]]
        return Spread.of(p.throughput / s.throughput for s, p in zip(seq, par, strict=True))


# -- the server ---------------------------------------------------------------------------------

_SERVER = """
import sys
from supervisor.llm.fakeserver import FakeLLMServer
srv = FakeLLMServer().start()
print(srv.base_url, flush=True)
sys.stdin.read()
srv.stop()
"""


@contextmanager
def fake_server() -> Iterator[str]:
    """The fake LLM server in a subprocess; yields its base URL (no ``/v1``)."""
    proc = subprocess.Popen(
        [PYTHON, "-c", _SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"fake LLM server did not start: {url!r}")
        yield url
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the variants --------------------------------------------------------------------------------


async def _raw(stack: AsyncExitStack, url: str, module: str) -> Call:
    """A bare client of ``module`` (httpx2, or httpx for comparison) posting the body."""
    http = importlib.import_module(module)
    client = await stack.enter_async_context(
        http.AsyncClient(
            base_url=url + "/v1",
            limits=http.Limits(max_connections=64, max_keepalive_connections=64),
            timeout=30.0,
        )
    )
    content = orjson.dumps(BODY)
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}

    async def call(i: int) -> Any:
        response = await client.post("/chat/completions", content=content, headers=headers)
        response.raise_for_status()
        return orjson.loads(response.content)

    return call


async def _provider(stack: AsyncExitStack, url: str) -> Call:
    from supervisor.clock import SystemClock
    from supervisor.llm.base import ChatRequest, Message
    from supervisor.llm.config import ProviderConfig
    from supervisor.llm.providers import build_provider

    config = ProviderConfig(base_url=url + "/v1", max_connections=64)
    provider = build_provider("fake", config, KEY, SystemClock())
    stack.push_async_callback(provider.aclose)
    messages = tuple(Message(m["role"], m["content"]) for m in MESSAGES)  # type: ignore[arg-type]
    request = ChatRequest(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)

    async def call(i: int) -> Any:
        return await provider.complete(request)

    return call


async def _service(
    stack: AsyncExitStack, url: str, store_kind: str, tmp: Path
) -> tuple[Any, list[Any]]:
    """An ``LLMService`` on ``url`` and one ``ctx.llm`` per worker (as 32 runs would have)."""
    from prometheus_client import CollectorRegistry

    from supervisor.clock import SystemClock
    from supervisor.config import AgentConfig, ScheduleConfig
    from supervisor.context import RunContext
    from supervisor.guards.steps import StepCounter
    from supervisor.llm.client import LLMService
    from supervisor.llm.config import LLMConfig
    from supervisor.logging import get_logger
    from supervisor.metrics import Metrics
    from supervisor.state import JsonFileStore, MemoryStore, StateStore

    config = LLMConfig.model_validate(
        {
            "providers": {
                "fake": {
                    "base_url": url + "/v1",
                    "api_key": {"secret": "bench_key"},
                    "max_connections": 64,
                }
            },
            "models": {f"fake/{MODEL}": {"price": {"input": 0.15, "output": 0.6}}},
            "aliases": {"bench": [f"fake/{MODEL}"]},
            "budgets": {"global_day": {"usd": 1e6}},
        }
    )
    store: StateStore = (
        JsonFileStore(tmp / f"state-{store_kind}") if store_kind == "json" else MemoryStore()
    )
    await store.open()
    stack.push_async_callback(store.close)
    clock = SystemClock()
    service = LLMService(
        config, {"bench_key": KEY}, store=store, clock=clock, metrics=Metrics(CollectorRegistry())
    )
    await service.start()
    stack.push_async_callback(service.aclose)
    agent = AgentConfig(name="bench", run="m:f", schedule=ScheduleConfig(every=3600))
    handles = [
        RunContext(
            agent="bench",
            run_id=f"run-{i}",
            state={},
            steps=StepCounter(None),
            clock=clock,
            log=get_logger(),
            services={"llm": service},
            config=agent,
        ).llm
        for i in range(CONCURRENCY)
    ]
    return service, handles


async def _ctx_llm(stack: AsyncExitStack, url: str, store_kind: str, tmp: Path) -> Call:
    _, handles = await _service(stack, url, store_kind, tmp)

    async def call(i: int) -> Any:
        return await handles[i % CONCURRENCY].complete("bench", MESSAGES, max_tokens=MAX_TOKENS)

    return call


async def _openai(stack: AsyncExitStack, url: str) -> Call:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30.0)
    stack.push_async_callback(client.close)

    async def call(i: int) -> Any:
        return await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
        )

    return call


async def _litellm(stack: AsyncExitStack, url: str) -> Call:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True

    async def call(i: int) -> Any:
        return await litellm.acompletion(
            model=f"openai/{MODEL}",
            api_base=url + "/v1",
            api_key=KEY,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            num_retries=0,
        )

    return call


async def _build(variant: str, stack: AsyncExitStack, url: str, tmp: Path) -> Call:
    if variant == RAW:
        return await _raw(stack, url, "httpx2")
    if variant == PROVIDER:
        return await _provider(stack, url)
    if variant == MEMORY:
        return await _ctx_llm(stack, url, "memory", tmp)
    if variant == JSON:
        return await _ctx_llm(stack, url, "json", tmp)
    if variant == HTTPX:
        return await _raw(stack, url, "httpx")
    if variant == OPENAI:
        return await _openai(stack, url)
    return await _litellm(stack, url)


_PACKAGES = {HTTPX: "httpx", OPENAI: "openai", LITELLM: "litellm"}


def _missing(variant: str) -> str | None:
    import importlib.util

    package = _PACKAGES.get(variant)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"`{package}` is not installed (`.venv/bin/pip install openai litellm`)"
    return None


# -- measuring -----------------------------------------------------------------------------------


async def _measure(call: Call, calls: int, concurrency: int) -> Sample:
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    if concurrency == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Sample(cpu / calls, calls / wall, quantile(latencies, 0.5), quantile(latencies, 0.99))


async def _bench(
    calls: int, rounds: int, url: str, result: LLMBenchResult, devnull: BinaryIO, tmp: Path
) -> None:
    from supervisor.logging import configure_logging

    # The daemon's default: every attempt's llm.call line is rendered (then dropped).
    configure_logging("info", stream=devnull)
    async with AsyncExitStack() as stack:
        runners: dict[str, Call] = {}
        for variant in VARIANTS:
            why = _missing(variant)
            if why is not None:
                result.skipped[variant] = why
                continue
            try:
                runners[variant] = await _build(variant, stack, url, Path(tmp))
            except Exception as exc:  # an SDK that cannot even be set up is reported
                result.skipped[variant] = f"{type(exc).__name__}: {exc}"[:200]
        for variant, call in runners.items():  # warm-up: imports, connections, caches
            for concurrency in (1, CONCURRENCY):
                await _measure(call, max(64, calls // 10), concurrency)
            result.samples[variant] = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode, concurrency in zip(MODES, (1, CONCURRENCY), strict=True):
                for variant, call in runners.items():
                    gc.collect()
                    sample = await _measure(call, calls, concurrency)
                    result.samples[variant][mode].append(sample)


class _NoMetrics:
    """A ``Metrics`` stand-in whose every method does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


#: (variant, log level) pairs of the breakdown, in the order they run in each round
BREAKDOWN = (
    ("whole", "info"),
    ("ledger stubbed", "info"),
    ("metrics stubbed", "info"),
    ("whole", "warning"),
)


async def _breakdown(
    calls: int, rounds: int, result: LLMBenchResult, devnull: BinaryIO, tmp: Path
) -> None:
    """CPU per call of the client path alone: the provider answers from memory, and parts of
    the path are stubbed out on the bench's own service instances to attribute the cost."""
    from supervisor.llm.base import ChatRequest, ChatResponse, Usage
    from supervisor.llm.budget import Reservation
    from supervisor.logging import configure_logging

    answer = ChatResponse("echo: fine", MODEL, Usage(15, 4), "stop", "bench")

    async def canned(request: ChatRequest) -> ChatResponse:
        return answer

    async def reserve(agent: str, run_id: str, usd: float, tokens: int, **kw: Any) -> Any:
        return Reservation(0, agent, run_id, usd, tokens)

    async def settle(reservation: Any, usd: float, tokens: int) -> None:
        return None

    async with AsyncExitStack() as stack:
        handles: dict[str, Any] = {}
        for name in dict(BREAKDOWN):
            service, llms = await _service(stack, "http://127.0.0.1:9", "memory", Path(tmp))
            service.providers["fake"].provider.complete = canned
            if name == "ledger stubbed":
                service.ledger.reserve, service.ledger.settle = reserve, settle
            elif name == "metrics stubbed":
                service.metrics = _NoMetrics()
            handles[name] = llms[0]
        series = {f"{name}, log {level}": [] for name, level in BREAKDOWN}
        for round_ in range(rounds + 1):  # the first round warms up
            for name, level in BREAKDOWN:
                configure_logging(level, stream=devnull)
                llm = handles[name]
                gc.collect()
                cpu0 = time.process_time()
                for _ in range(calls):
                    await llm.complete("bench", MESSAGES, max_tokens=MAX_TOKENS)
                if round_:
                    series[f"{name}, log {level}"].append((time.process_time() - cpu0) / calls)
        configure_logging("info", stream=devnull)
    result.breakdown = series


def bench_llm(*, calls: int = 400, rounds: int = 5) -> LLMBenchResult:
    """Section 7: see the module docstring."""
    result = LLMBenchResult(calls, rounds)
    result.versions = package_versions(("httpx2", "httpx", "openai", "litellm"))
    result.date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    # Rendered log lines go to /dev/null; ledgers of the json variant live in a temp dir.
    with open(os.devnull, "wb") as devnull, tempfile.TemporaryDirectory() as tmp:
        with fake_server() as url:
            asyncio.run(_bench(calls, rounds, url, result, devnull, Path(tmp)))
        asyncio.run(_breakdown(max(calls * 10, 4000), rounds, result, devnull, Path(tmp)))
    return result


# -- the report ----------------------------------------------------------------------------------


def _us(s: Spread) -> str:
    return f"{s.median * 1e6:,.0f} µs ({s.p10 * 1e6:,.0f}–{s.p90 * 1e6:,.0f})"


def _x(s: Spread) -> str:
    return f"{s.median:.2f}× ({s.p10:.2f}–{s.p90:.2f})"


def summary_rows(r: LLMBenchResult) -> list[tuple[str, str, str, bool | None]]:
    """(measure, target, measured, passed) for the targets of the issue."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for mode in MODES:
        ratio = r.ratio(MEMORY, RAW, mode)
        rows.append(
            (
                f"`ctx.llm` CPU per call ÷ raw httpx2, {mode}",
                f"≤ {CPU_TARGET}×",
                _x(ratio),
                ratio.median <= CPU_TARGET,
            )
        )
    for sdk, target in ((OPENAI, OPENAI_TARGET), (LITELLM, LITELLM_TARGET)):
        if sdk not in r.samples:
            rows.append((f"{sdk} CPU per call ÷ `ctx.llm`", f"≥ {target:g}×", "not run", None))
            continue
        for mode in MODES:
            ratio = r.ratio(sdk, MEMORY, mode)
            rows.append(
                (
                    f"{sdk} CPU per call ÷ `ctx.llm`, {mode}",
                    f"≥ {target:g}×",
                    _x(ratio),
                    ratio.median >= target,
                )
            )
    for variant in (MEMORY, JSON):
        scale = r.scaling(variant)
        rows.append(
            (
                f"`{variant}` throughput at 32 in flight ÷ sequential",
                "≥ 1×",
                _x(scale),
                scale.median >= 1.0,
            )
        )
    return rows


def render_section(r: LLMBenchResult, heading: str = "## 7. LLM calls") -> str:
    """The "LLM calls" section of ``docs/performance.md``."""
    out: list[str] = []
    w = out.append
    w(heading + "\n")
    w("```sh\n.venv/bin/pip install openai litellm   # benchmark-only, not in pyproject")
    w(f".venv/bin/python -m tests.bench.bench_llm --rounds {r.rounds} --calls {r.calls} --write")
    w("```\n")
    w(
        f"Run {r.date}; " + ", ".join(f"{k} {v}" for k, v in r.versions.items()) + ". "
        "The fake LLM server runs in its own process (so CPU time here is the client's only); "
        "every variant posts the same Chat Completions body to it over loopback keep-alive "
        f"connections and parses the JSON answer. {r.calls} calls per variant, mode and round, "
        f"{r.rounds} rounds interleaving the variants; median (p10–p90) over the rounds, ratios "
        "taken within each round. CPU is `time.process_time()` (all threads) per call. "
        "`ctx.llm[memory]` keeps the budget ledger in a `MemoryStore`, `ctx.llm[json]` in a "
        "`JsonFileStore` (each reservation is durable before the request goes: a group-commit "
        "write with fsync in a worker thread).\n"
    )
    w("| measure | target | measured | verdict |")
    w("|---|---|---|---|")
    for measure, target, measured, passed in summary_rows(r):
        w(f"| {measure} | {target} | {measured} | {'–' if passed is None else verdict(passed)} |")
    w("")
    for mode in MODES:
        w(f"**{mode}**\n")
        w("| variant | CPU per call | × raw httpx2 | calls/s | latency p50 | latency p99 |")
        w("|---|---|---|---|---|---|")
        for variant in r.measured():
            cpu = r.spread(variant, mode, "cpu_per_call")
            tput = r.spread(variant, mode, "throughput")
            p50 = r.spread(variant, mode, "p50")
            p99 = r.spread(variant, mode, "p99")
            w(
                f"| {variant} | {_us(cpu)} | {_x(r.ratio(variant, RAW, mode))} | "
                f"{tput.median:,.0f} ({tput.p10:,.0f}–{tput.p90:,.0f}) | "
                f"{p50.median * 1e3:.2f} ms | {p99.median * 1e3:.2f} ms |"
            )
        w("")
    w("Throughput at 32 in flight ÷ sequential (same round):\n")
    w("| variant | ratio |")
    w("|---|---|")
    for variant in r.measured():
        w(f"| {variant} | {_x(r.scaling(variant))} |")
    w("")
    for variant, why in r.skipped.items():
        w(f"- `{variant}` not measured: {why}")
    if r.skipped:
        w("")
    if r.breakdown:
        _render_breakdown(r, w)
    return "\n".join(out)


def _render_breakdown(r: LLMBenchResult, w: Callable[[str], None]) -> None:
    b = r.breakdown
    whole = Spread.of(b["whole, log info"])

    def part(minus: str, base: str = "whole, log info") -> Spread:
        return Spread.of(x - y for x, y in zip(b[base], b[minus], strict=True))

    ledger = part("ledger stubbed, log info")
    metrics = part("metrics stubbed, log info")
    line = part("whole, log warning")
    rest = whole.median - ledger.median - metrics.median - line.median
    seq = MODES[0]
    overhead = Spread.of(
        c.cpu_per_call - raw.cpu_per_call
        for c, raw in zip(r.samples[MEMORY][seq], r.samples[RAW][seq], strict=True)
    )
    raw_cpu = r.spread(RAW, seq, "cpu_per_call").median
    provider = Spread.of(
        p.cpu_per_call - raw.cpu_per_call
        for p, raw in zip(r.samples[PROVIDER][seq], r.samples[RAW][seq], strict=True)
    )
    above = Spread.of(
        c.cpu_per_call - p.cpu_per_call
        for c, p in zip(r.samples[MEMORY][seq], r.samples[PROVIDER][seq], strict=True)
    )
    w(
        "**Where the client's CPU goes.** `ctx.llm.complete` again, with the provider's "
        "`complete` answering from memory on the bench's own instance (no HTTP), and one part "
        "at a time stubbed out (the ledger's `reserve`/`settle`, the `Metrics` object) or the "
        "log level raised to `warning` (the `llm.call` line is then not rendered); "
        f"{len(b['whole, log info'])} rounds, CPU per call:\n"
    )
    w("| part of the client path | per call | share |")
    w("|---|---|---|")
    w(f"| the whole path, provider excluded | {_us(whole)} | 100% |")
    rows = (
        ("durable worst-case reservation + settlement (`BudgetLedger`, `MemoryStore`)", ledger),
        ("metrics (`Metrics.llm_*`: ~7 labelled series per call)", metrics),
        ("the `llm.call` JSON log line", line),
    )
    for label, spread in rows:
        w(f"| {label} | {_us(spread)} | {spread.median / whole.median:.0%} |")
    w(
        "| the rest: alias, breaker, price, context fit, step, Retry-After gate, rate "
        f"limiter, trace events, loop-guard fingerprint, result | {rest * 1e6:,.0f} µs | "
        f"{rest / whole.median:.0%} |"
    )
    w("")
    budget = (CPU_TARGET - 1) * raw_cpu
    w(
        f"Sequentially, `ctx.llm[memory]` spends {_us(overhead)} of CPU per call more than "
        f"the raw POST ({raw_cpu * 1e6:,.0f} µs); the 1.3× target allows {budget * 1e6:,.0f} µs. "
        f"Of that, the provider layer (`OpenAIProvider` − raw) is {_us(provider)} and "
        f"everything above it (`ctx.llm[memory]` − `OpenAIProvider`) {_us(above)}, against "
        f"{whole.median * 1e6:,.0f} µs for the same path with no I/O: the difference is the "
        "event-loop iterations the path adds between real I/O (the ledger's write lock and "
        "store commit each yield once per reservation, and every loop iteration is an "
        "`epoll` call). With the `JsonFileStore` ledger each reservation is also a durable "
        "write before the request goes (a group commit: one fsync per burst of concurrent "
        "callers, one per call when sequential).\n"
    )


def write_section(section: str, doc: Path, heading: str) -> None:
    """Replace the section that starts with ``heading`` in ``doc`` (up to the next ``## ``
    heading), or insert it before the closing "Time taken" section, or append it."""
    text = doc.read_text() if doc.exists() else ""
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        marker = "\n## Time taken by each part of the command"
        at = text.find(marker)
        if at >= 0:
            text = text[: at + 1] + section.rstrip("\n") + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per variant, mode, round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--write", action="store_true", help="put the section into docs/performance.md"
    )
    args = parser.parse_args()
    result = bench_llm(calls=args.calls, rounds=args.rounds)
    section = render_section(result)
    print(section)
    if args.write:
        heading = section.splitlines()[0]
        write_section(section, REPO / "docs" / "performance.md", heading)
        print(f"[bench] wrote the section into {REPO / 'docs' / 'performance.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
