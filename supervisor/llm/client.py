"""``ctx.llm``: the one way an agent talks to a model.

    complete(alias, messages, ...)
      -> alias allowed for this agent?                      (least privilege)
      -> for each tier of the alias's chain (the degradation ladder):
           breaker open? unpriced? context too long?       -> next tier, hop recorded
           per attempt: one step (max-steps guard), shared Retry-After gate, worst-case
           budget reservation (refused before any traffic), rate limit, provider call,
           settlement with reported usage, one log line, metrics
           transient error -> backoff with full jitter, retry (a timeout once with a
           smaller context); exhausted or permanent -> next tier
           schema given -> validate; one repair attempt; invalid -> next tier
      -> the agent's rule-based fallback, then the raw input with a note, if asked for
      -> else LadderExhausted

``BudgetExceeded`` is never swallowed by the ladder: it ends the run (``budget_exceeded``)
unless the agent catches it.
"""

from __future__ import annotations

import inspect
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import orjson
from pydantic import BaseModel, ValidationError

from supervisor.clock import Clock
from supervisor.errors import (
    BudgetExceeded,
    CallRefused,
    LadderExhausted,
    ProviderError,
    ProviderTimeout,
)
from supervisor.guards.breaker import CircuitBreaker, CircuitState
from supervisor.guards.loops import fingerprint
from supervisor.guards.retry import RetryPolicy
from supervisor.llm.base import ChatRequest, ChatResponse, Message, Provider, Usage, coerce_messages
from supervisor.llm.budget import BudgetLedger
from supervisor.llm.cache import ResponseCache, cache_key
from supervisor.llm.config import AgentLLMConfig, LLMConfig, ProviderConfig
from supervisor.llm.prices import Price, PriceTable
from supervisor.llm.providers import build_provider
from supervisor.llm.ratelimit import ProviderGate, RateLimiter
from supervisor.llm.tokens import Calibrator, fit_context
from supervisor.logging import get_logger
from supervisor.state.base import StateStore

_log = get_logger()

#: the budget gauges are refreshed at most this often (seconds) while calls are made
BUDGET_PUBLISH_INTERVAL = 1.0

#: tier label of the agent's rule-based fallback and of the raw-data answer
TIER_RULE_BASED = "rule_based"
TIER_RAW = "raw"


@dataclass(frozen=True, slots=True)
class LLMResult:
    """What ``ctx.llm.complete`` returns."""

    #: the model's text ("" for the rule-based and raw tiers)
    text: str
    #: the parsed schema instance, the fallback's value or the raw input; else the text
    value: Any
    #: which tier answered: "0", "1", ... (chain index), "rule_based" or "raw"
    tier: str
    provider: str | None = None
    model: str | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    cached: bool = False
    #: true when the answer did not come from the alias's first model
    degraded: bool = False
    note: str | None = None
    #: tiers that failed before this one, with the reason each failed
    hops: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class _ProviderRuntime:
    name: str
    config: ProviderConfig
    provider: Provider
    limiter: RateLimiter
    gate: ProviderGate
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)


class LLMService:
    """Daemon-wide LLM machinery shared by every agent: providers, gates, budgets, cache."""

    def __init__(
        self,
        config: LLMConfig,
        secrets: Mapping[str, str],
        *,
        store: StateStore,
        clock: Clock,
        metrics: Any,
        state_dir: Path | None = None,
        prices: PriceTable | None = None,
        rng: random.Random | None = None,
        budget: Any = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.prices = (prices or PriceTable.bundled()).with_overrides(config.models)
        #: spend windows: ``budget`` when given (``PgBudgetLedger``, shared by a cluster),
        #: else kept as a document of ``store``
        self.ledger = budget if budget is not None else BudgetLedger(store, clock, config.budgets)
        self.calibrator = Calibrator()
        self.rng = rng or random.Random()
        self.cache: ResponseCache | None = None
        if config.cache.enabled and state_dir is not None:
            self.cache = ResponseCache(
                Path(state_dir) / "llm-cache",
                ttl=config.cache.ttl,
                max_entries=config.cache.max_entries,
                clock=clock,
            )
        self._secrets = dict(secrets)
        # Budget gauges: a ledger snapshot walks (and sorts) every window, too much work to
        # repeat on every call; see ``publish_budget``.
        self._budget_published = -math.inf
        self._budget_dirty = False
        self.providers: dict[str, _ProviderRuntime] = {}
        for name, pconf in config.providers.items():
            self.providers[name] = self._build(name, pconf)

    def _build(self, name: str, pconf: ProviderConfig) -> _ProviderRuntime:
        key = None
        if pconf.api_key is not None:
            key = self._secrets.get(pconf.api_key.secret.lower())
            if key is None:
                _log.warning("llm.missing_api_key", provider=name, secret=pconf.api_key.secret)
        return _ProviderRuntime(
            name,
            pconf,
            build_provider(name, pconf, key, self.clock),
            RateLimiter(pconf.rpm, pconf.tpm, self.clock),
            ProviderGate(self.clock),
        )

    async def start(self) -> None:
        """Restore persisted spend windows and publish them, so that the budget gauges show
        the day's spend from the start rather than after the first call."""
        await self.ledger.load()
        self.publish_budget(force=True)

    async def aclose(self) -> None:
        for runtime in self.providers.values():
            await runtime.provider.aclose()
        await self.ledger.close()

    def for_run(self, ctx: Any) -> AgentLLM:
        """The per-run handle (``ctx.llm``)."""
        agent_cfg = ctx.config.llm if getattr(ctx, "config", None) is not None else AgentLLMConfig()
        return AgentLLM(self, ctx, agent_cfg)

    def end_run(self, run_id: str) -> None:
        self.ledger.end_run(run_id)
        if self._budget_dirty:
            self.publish_budget(force=True)

    def publish_budget(self, *, force: bool = False) -> None:
        """Set the budget gauges from the ledger: at most every ``BUDGET_PUBLISH_INTERVAL``
        seconds while calls are made, and when forced (at start, at the end of a run that
        spent anything)."""
        now = self.clock.monotonic()
        if not force and now - self._budget_published < BUDGET_PUBLISH_INTERVAL:
            self._budget_dirty = True
            return
        self._budget_published = now
        self._budget_dirty = False
        self.metrics.set_budget(self.ledger.snapshot())

    def breaker(self, runtime: _ProviderRuntime, model: str) -> CircuitBreaker:
        found = runtime.breakers.get(model)
        if found is None:
            c = runtime.config.circuit
            found = runtime.breakers[model] = CircuitBreaker(c.failures, c.cooldown, self.clock)
        return found

    def price_for(self, provider: str, model: str) -> Price | None:
        return self.prices.price(provider, model)


class AgentLLM:
    """``ctx.llm`` for one run: every call is charged to this agent and run."""

    def __init__(self, service: LLMService, ctx: Any, agent_cfg: AgentLLMConfig) -> None:
        self._svc = service
        self._ctx = ctx
        self._cfg = agent_cfg
        self.agent: str = ctx.agent
        self.run_id: str = ctx.run_id

    async def complete(
        self,
        alias: str,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        schema: type[BaseModel] | None = None,
        fallback: Callable[[], Any] | None = None,
        degrade_to: Any = None,
        stream: bool | None = None,
        use_cache: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> LLMResult:
        """Ask the model chain behind ``alias``.

        ``schema``: parse and validate the answer (one repair attempt, then the next tier).
        ``fallback``: the agent's rule-based answer (sync or async, no arguments) when every
        tier failed. ``degrade_to``: returned as the raw-data answer with a note when even
        that is missing. Raises ``CallRefused`` (alias not allowed or unknown),
        ``BudgetExceeded`` (a limit would be passed), ``MaxStepsExceeded``, and
        ``LadderExhausted`` when nothing answered and no fallback was given.
        """
        chain = self._chain(alias)
        msgs = coerce_messages(messages)
        fp = fingerprint(
            alias,
            [[m.role, m.content] for m in msgs],
            max_tokens,
            temperature,
            schema.__name__ if schema else None,
            dict(extra or {}),
        )
        # The loop guard sees one call per complete(), before any traffic: a model asked the
        # same question over and over is refused here, not after the money is spent.
        self._ctx.call_started("llm", fp)
        result: LLMResult | None = None
        try:
            result = await self._ladder(
                alias,
                chain,
                msgs,
                max_tokens,
                temperature,
                schema,
                fallback,
                degrade_to,
                stream,
                use_cache,
                extra,
            )
            return result
        finally:
            answer = fingerprint(result.text) if result is not None and result.text else None
            self._ctx.call_finished("llm", fp, answer, failed=result is None)

    async def _ladder(
        self,
        alias: str,
        chain: list[str],
        msgs: tuple[Message, ...],
        max_tokens: int | None,
        temperature: float | None,
        schema: type[BaseModel] | None,
        fallback: Callable[[], Any] | None,
        degrade_to: Any,
        stream: bool | None,
        use_cache: bool,
        extra: Mapping[str, Any] | None,
    ) -> LLMResult:
        svc = self._svc
        hops: list[tuple[str, str]] = []
        for index, ref in enumerate(chain):
            provider, _, model = ref.partition("/")
            try:
                result = await self._tier(
                    alias,
                    str(index),
                    provider,
                    model,
                    msgs,
                    max_tokens,
                    temperature,
                    schema,
                    stream,
                    use_cache,
                    extra or {},
                )
            except BudgetExceeded:
                svc.metrics.llm_refused(self.agent, "budget")
                raise
            except (CallRefused, ProviderError, _InvalidOutput) as exc:
                reason = _hop_reason(exc)
                hops.append((ref, reason))
                if isinstance(exc, CallRefused):
                    svc.metrics.llm_refused(self.agent, reason)
                self._hop(alias, ref, reason, str(exc))
            else:
                if index:
                    result = replace(result, degraded=True, hops=tuple(hops))
                svc.metrics.llm_answered(self.agent, alias, result.tier)
                return result
        return await self._degrade(alias, hops, fallback, degrade_to)

    def _chain(self, alias: str) -> list[str]:
        """The alias's chain. Raises ``CallRefused`` when not allowed here or unknown."""
        svc = self._svc
        if self._cfg.aliases is not None and alias not in self._cfg.aliases:
            svc.metrics.llm_refused(self.agent, "alias_not_allowed")
            raise CallRefused(
                "alias_not_allowed",
                f"agent {self.agent!r} may not use model alias {alias!r} "
                f"(allowed: {', '.join(self._cfg.aliases) or 'none'})",
            )
        chain = svc.config.aliases.get(alias)
        if chain is None:
            svc.metrics.llm_refused(self.agent, "unknown_alias")
            raise CallRefused("unknown_alias", f"unknown model alias {alias!r}")
        return chain

    async def _degrade(
        self,
        alias: str,
        hops: list[tuple[str, str]],
        fallback: Callable[[], Any] | None,
        degrade_to: Any,
    ) -> LLMResult:
        """Every tier failed: the rule-based answer, else the raw data, else raise."""
        if fallback is not None:
            tier, value = TIER_RULE_BASED, fallback()
            if inspect.isawaitable(value):
                value = await value
            note = f"every model of {alias!r} failed; rule-based answer"
        elif degrade_to is not None:
            tier, value = TIER_RAW, degrade_to
            note = f"degraded: every model of {alias!r} failed; raw data returned"
        else:
            raise LadderExhausted(alias, hops)
        self._svc.metrics.llm_answered(self.agent, alias, tier)
        _log.warning("llm.degraded", alias=alias, tier=tier, hops=hops)
        return LLMResult("", value, tier, degraded=True, hops=tuple(hops), note=note)

    def _hop(self, alias: str, ref: str, reason: str, detail: str) -> None:
        self._ctx.trace_event("llm.hop", alias=alias, tier=ref, reason=reason)
        _log.warning("llm.fallback", alias=alias, failed=ref, reason=reason, error=detail[:500])

    async def _tier(
        self,
        alias: str,
        tier: str,
        provider_name: str,
        model: str,
        msgs: tuple[Message, ...],
        max_tokens: int | None,
        temperature: float | None,
        schema: type[BaseModel] | None,
        stream: bool | None,
        use_cache: bool,
        extra: Mapping[str, Any],
    ) -> LLMResult:
        svc = self._svc
        runtime = svc.providers[provider_name]
        breaker = svc.breaker(runtime, model)
        if not breaker.allow():
            raise CallRefused("circuit_open", f"circuit open for {provider_name}/{model}")
        # A half-open trial that ends without a verdict (refused by the budget, the rate
        # limit or the Retry-After gate, out of steps, cancelled) gives the trial back;
        # otherwise the circuit would stay half-open and the ladder skip this model for good.
        trial = breaker.state is CircuitState.HALF_OPEN
        try:
            price = svc.price_for(provider_name, model)
            if price is None and not svc.config.allow_unpriced:
                raise CallRefused(
                    "unpriced",
                    f"{provider_name}/{model} has no price: set llm.models.{provider_name}/{model}"
                    ".price or llm.allow_unpriced",
                )
            model_cfg = svc.config.models.get(f"{provider_name}/{model}")
            limit = (model_cfg.max_output if model_cfg else None) or None
            want = max_tokens or svc.config.default_max_tokens
            out_tokens = min(want, limit) if limit else want
            context = (model_cfg.context if model_cfg else None) or svc.prices.context(
                provider_name, model
            )
            if context:
                msgs, dropped = fit_context(
                    msgs,
                    context=context,
                    max_tokens=out_tokens,
                    strategy=svc.config.context.strategy,
                    estimate=lambda m: svc.calibrator.estimate(model, m),
                )
                if dropped:
                    _log.info("llm.context_pruned", model=model, dropped=dropped)
            request = ChatRequest(
                model=model,
                messages=msgs,
                max_tokens=out_tokens,
                temperature=temperature,
                stream=runtime.config.stream if stream is None else stream,
                json_mode=schema is not None,
                extra=dict(extra),
            )
            response, cost, cached = await self._call(
                alias, tier, runtime, breaker, price, request, context, use_cache
            )
            value: Any = response.text
            if schema is not None:
                try:
                    value = _parse(schema, response.text)
                except ValidationError as exc:
                    repair = ChatRequest(
                        model=model,
                        messages=(
                            *msgs,
                            Message("assistant", response.text),
                            Message("user", _repair_prompt(schema, exc)),
                        ),
                        max_tokens=out_tokens,
                        temperature=temperature,
                        stream=request.stream,
                        json_mode=True,
                        extra=dict(extra),
                    )
                    response, more, cached = await self._call(
                        alias, tier, runtime, breaker, price, repair, context, use_cache
                    )
                    cost += more
                    try:
                        value = _parse(schema, response.text)
                    except ValidationError as exc2:
                        raise _InvalidOutput(str(exc2)) from None
            return LLMResult(
                response.text,
                value,
                tier,
                provider_name,
                model,
                response.usage,
                round(cost, 8),
                cached,
            )
        finally:
            if trial:
                breaker.release_trial()

    async def _call(
        self,
        alias: str,
        tier: str,
        runtime: _ProviderRuntime,
        breaker: CircuitBreaker,
        price: Price | None,
        request: ChatRequest,
        context: int | None,
        use_cache: bool,
    ) -> tuple[ChatResponse, float, bool]:
        """One request to one tier: cache, then attempts with call-level retry."""
        svc, clock = self._svc, self._svc.clock
        key = None
        if svc.cache is not None and use_cache:
            key = cache_key(
                runtime.name,
                request.model,
                request.messages,
                request.max_tokens,
                request.temperature,
                request.json_mode,
                request.extra,
            )
            hit = await svc.cache.get(key)
            svc.metrics.llm_cache(hit is not None)
            if hit is not None:
                breaker.release_trial()
                call = _Call(alias, tier, runtime.name, request, 0)
                self._log_attempt(call, "cache_hit", 0.0, hit.usage, 0.0, cached=True)
                return hit, 0.0, True
        rc = runtime.config.retry
        policy = RetryPolicy(
            max_attempts=rc.attempts,
            base_delay=rc.base_delay,
            max_delay=rc.max_delay,
            max_total=float("inf"),
        )
        shrunk = False
        started = clock.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                response, cost = await self._attempt(
                    _Call(alias, tier, runtime.name, request, attempt), runtime, breaker, price
                )
            except ProviderError as exc:
                # A permanent error, or a circuit this failure just opened: next tier.
                if not exc.transient or breaker.state is not CircuitState.CLOSED:
                    raise
                if isinstance(exc, ProviderTimeout) and not shrunk and context:
                    shrunk = True
                    request = self._shrink(request, context)
                delay = policy.next_delay(attempt, clock.monotonic() - started, rng=svc.rng)
                if delay is None:
                    raise
                svc.metrics.llm_retry(runtime.name, request.model)
                await clock.sleep(delay)
                continue
            if key is not None and svc.cache is not None:
                await svc.cache.put(key, response)
            return response, cost, False

    async def _attempt(
        self,
        call: _Call,
        runtime: _ProviderRuntime,
        breaker: CircuitBreaker,
        price: Price | None,
    ) -> tuple[ChatResponse, float]:
        """One attempt: step, Retry-After gate, reservation, rate limit, request, settlement.

        Raises ``ProviderError`` after settling, logging and feeding the breaker.
        """
        svc, request = self._svc, call.request
        rc = runtime.config.retry
        self._ctx.step(f"llm:{call.alias}")  # every attempt, retries included, is a step
        self._ctx.touch("llm.wait", call.provider, grace=runtime.gate.remaining())
        await runtime.gate.wait(max_wait=rc.max_wait)
        estimate = svc.calibrator.estimate(request.model, request.messages)
        worst_tokens = estimate + request.max_tokens
        worst_usd = price.worst_case(estimate, request.max_tokens) if price else 0.0
        reservation = await svc.ledger.reserve(
            self.agent,
            self.run_id,
            worst_usd,
            worst_tokens,
            run_limit=self._cfg.per_run,
            agent_day_limit=self._cfg.per_agent_day,
        )
        try:
            await runtime.limiter.acquire(worst_tokens, max_wait=rc.max_wait)
        except BaseException:  # refused, or cancelled while waiting: nothing was sent
            with anyio.CancelScope(shield=True):
                await svc.ledger.release(reservation)
            raise
        t0 = time.perf_counter()
        try:
            response = await runtime.provider.complete(request)
        except ProviderError as exc:
            took = time.perf_counter() - t0
            # No answer: an error status costs nothing; a timeout or a reset may have been
            # billed, so its worst case stands as the cost (flagged in the log line).
            charged = 0.0 if exc.status is not None else worst_usd
            await svc.ledger.settle(reservation, charged, 0 if exc.status else worst_tokens)
            svc.publish_budget()
            if exc.retry_after:
                runtime.gate.block_for(exc.retry_after)
            self._log_attempt(call, _reason(exc), took, None, charged, error=str(exc))
            if exc.transient:
                breaker.record_failure()
            else:
                breaker.release_trial()
            svc.metrics.llm_circuit(runtime.name, request.model, breaker.state.code)
            raise
        except BaseException:
            # Cancelled mid-request (run deadline, shutdown): the provider may still bill it,
            # so the worst case stands as the cost rather than staying reserved for good.
            with anyio.CancelScope(shield=True):
                await svc.ledger.settle(reservation, worst_usd, worst_tokens)
            raise
        took = time.perf_counter() - t0
        usage = response.usage
        if usage is None:
            cost = worst_usd  # no usage reported: the reservation stands as the cost
        else:
            cost = price.cost(usage) if price is not None else 0.0
        await svc.ledger.settle(
            reservation, cost, usage.total if usage is not None else worst_tokens
        )
        if usage is not None:
            svc.calibrator.observe(request.model, estimate, usage.input_tokens)
        breaker.record_success()
        svc.metrics.llm_circuit(runtime.name, request.model, breaker.state.code)
        svc.publish_budget()
        self._log_attempt(call, "ok", took, usage, cost, usage_missing=usage is None)
        return response, cost

    def _shrink(self, request: ChatRequest, context: int) -> ChatRequest:
        svc = self._svc
        msgs, dropped = fit_context(
            request.messages,
            context=max(256, int(context * svc.config.context.shrink_on_timeout)),
            max_tokens=request.max_tokens,
            strategy="drop_middle",
            estimate=lambda m: svc.calibrator.estimate(request.model, m),
        )
        _log.info("llm.context_shrunk", model=request.model, dropped=dropped)
        return ChatRequest(
            request.model,
            msgs,
            request.max_tokens,
            request.temperature,
            request.stream,
            request.json_mode,
            request.idempotency_key,
            request.extra,
        )

    def _log_attempt(
        self,
        call: _Call,
        status: str,
        took: float,
        usage: Usage | None,
        cost: float,
        *,
        cached: bool = False,
        error: str | None = None,
        usage_missing: bool = False,
    ) -> None:
        svc, request = self._svc, call.request
        svc.metrics.llm_call(
            self.agent, call.provider, request.model, status, took, usage, cost, cached
        )
        self._ctx.trace_event(
            "llm.call",
            alias=call.alias,
            provider=call.provider,
            model=request.model,
            attempt=call.attempt,
            status=status,
            duration_s=round(took, 6),
            cost_usd=round(cost, 8),
        )
        fields: dict[str, Any] = {
            "alias": call.alias,
            "tier": call.tier,
            "provider": call.provider,
            "model": request.model,
            "attempt": call.attempt,
            "status": status,
            "duration_s": round(took, 6),
            "tokens_in": usage.input_tokens if usage else None,
            "tokens_out": usage.output_tokens if usage else None,
            "tokens_cached": usage.cached_input_tokens if usage else None,
            "cost_usd": round(cost, 8),
            "cache_hit": cached,
        }
        if usage_missing:
            fields["usage_missing"] = True
        if error:
            fields["error"] = error[:500]
        if svc.config.log_bodies:
            fields["request_body"] = orjson.dumps(
                [{"role": m.role, "content": m.content} for m in request.messages]
            ).decode()[: svc.config.log_body_limit]
        _log.info("llm.call", **fields)


@dataclass(frozen=True, slots=True)
class _Call:
    """Who is calling what, for the log line of one attempt."""

    alias: str
    tier: str
    provider: str
    request: ChatRequest
    attempt: int


class _InvalidOutput(Exception):
    """The answer failed the schema after the repair attempt (internal: becomes a hop)."""


def _reason(exc: ProviderError) -> str:
    if exc.status is not None:
        return f"http_{exc.status}"
    return {
        "ProviderTimeout": "timeout",
        "ProviderConnectionError": "connection",
        "MalformedResponse": "malformed",
    }.get(type(exc).__name__, "error")


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _parse(schema: type[BaseModel], text: str) -> BaseModel:
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1)
    return schema.model_validate_json(body)


def _repair_prompt(schema: type[BaseModel], exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
        for e in exc.errors(include_url=False)[:10]
    )
    return (
        "Your previous answer did not match the required JSON schema: "
        f"{problems}. Reply with only a JSON object matching this schema:\n"
        + orjson.dumps(schema.model_json_schema()).decode()
    )


def _hop_reason(exc: Exception) -> str:
    if isinstance(exc, CallRefused):
        return exc.reason
    if isinstance(exc, ProviderError):
        return _reason(exc)
    return "invalid_output"
