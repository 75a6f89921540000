"""The budget ledger: spend windows, worst-case reservations before a call, settlement after.

    window        key          period        limit                       kept
    run           run id       the run       per_run (or the agent's)    in memory
    agent_day     agent name   UTC day       per_agent_day (or agent's)  store, doc "budget"
    global_hour   "global"     UTC hour      global_hour                 store
    global_day    "global"     UTC day       global_day                  store

Before a call the caller reserves its worst case (every prompt token at the full input price
plus ``max_tokens`` of output). The reservation is checked against every window that applies
and added to all of them in one step with no ``await`` in between, so concurrent callers see
each other and the sum of what they reserve never passes a limit. After the call the actual
cost replaces the reservation (``settle``); a cost above the reservation is recorded as it is.

Durability: ``reserve`` returns only once a document holding the reservation is in the store,
and that document counts outstanding reservations as spent, so after a crash the windows hold
at least everything that may have been billed. Writes are group commits: one write at a time,
and every reserver that arrived while it ran is covered by the next one, so a burst of N
reservations costs a couple of writes, not N. Settlements are written lazily (with the next
reservation, ``flush`` or ``close``), except one above its reservation, which is written
before ``settle`` returns.

Money is counted in integer nano-dollars so that sums are exact: ten calls of $0.10 fit a
$1.00 limit. Windows follow ``clock.now()`` in UTC and never move backwards: if the wall clock
is set back across a boundary, the newer window stays current until time catches up (across a
restart too, for a document written up to a day "ahead" of the clock).

One ledger per store: several processes sharing one state directory would overwrite each
other's windows (the PostgreSQL store is the way to share budgets between nodes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supervisor.clock import Clock
from supervisor.errors import BudgetExceeded, StateCorruptError
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.state.base import StateStore
from supervisor.state.jsonfile import doc_subject

__all__ = ["DOC_NAME", "BudgetLedger", "Reservation", "WindowKind", "WindowStatus"]

#: the store document that holds the persisted windows
DOC_NAME = "budget"
_DOC_VERSION = 1
_NANO = 1_000_000_000
_GLOBAL = "global"
_DAY, _HOUR = "%Y-%m-%d", "%Y-%m-%dT%H"
#: how far ahead of the clock a stored period may be and still be kept (see ``_restore``)
_CLOCK_BACK_TOLERANCE = timedelta(days=1)


class WindowKind(StrEnum):
    """The spend windows a call is counted in."""

    #: one run, in memory only (a run does not survive a restart)
    RUN = "run"
    #: one agent, one UTC day
    AGENT_DAY = "agent_day"
    #: every agent, one UTC hour
    GLOBAL_HOUR = "global_hour"
    #: every agent, one UTC day
    GLOBAL_DAY = "global_day"


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """One window as ``snapshot()`` reports it (for metrics and ``status``)."""

    #: the window kind (``WindowKind`` value)
    name: str
    #: the run id, the agent name, or ``"global"``
    key: str
    spent_usd: float
    reserved_usd: float
    limit_usd: float | None
    spent_tokens: int
    limit_tokens: int | None
    reserved_tokens: int = 0
    #: the UTC day (``2026-01-31``) or hour (``2026-01-31T13``); None for a run window
    period: str | None = None


@dataclass(slots=True, eq=False)
class _Window:
    kind: WindowKind
    key: str
    period: str | None
    spent: int = 0  # nano-dollars
    spent_tokens: int = 0
    reserved: int = 0
    reserved_tokens: int = 0
    #: the limit the last reservation was checked against (per-agent overrides vary)
    limit: LimitConfig | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Reservation:
    """A worst case held in every window of one call until ``settle`` or ``release``."""

    id: int
    agent: str
    run_id: str
    usd: float
    tokens: int
    #: the windows it is held in; a window that has since closed is updated harmlessly
    _windows: tuple[_Window, ...] = field(default=(), repr=False)


class _Spend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usd: float = Field(ge=0, allow_inf_nan=False)
    tokens: int = Field(ge=0)


class _LedgerDoc(BaseModel):
    """The persisted document; outstanding reservations are included as spent."""

    model_config = ConfigDict(extra="forbid")

    version: int
    updated_at: str
    day: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    hour: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}$")
    global_day: _Spend
    global_hour: _Spend
    agent_day: dict[str, _Spend]


class BudgetLedger:
    """Spend windows with worst-case reservations; one per daemon, shared by every run.

    ``limits`` may be replaced (config reload); it applies from the next reservation.
    """

    def __init__(self, store: StateStore, clock: Clock, limits: BudgetsConfig) -> None:
        self.limits = limits
        #: documents written so far (group commits)
        self.writes = 0
        self._store = store
        self._clock = clock
        self._windows: dict[tuple[WindowKind, str], _Window] = {}
        self._outstanding: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._day, self._hour = "", ""
        # Every change to a persisted window bumps _version; _durable is the newest version
        # known to be in the store.
        self._version = 0
        self._durable = 0
        self._write_lock = anyio.Lock()
        self._load_lock = anyio.Lock()
        self._loaded = False

    def __repr__(self) -> str:
        return f"BudgetLedger(outstanding={len(self._outstanding)}, windows={len(self._windows)})"

    @property
    def outstanding(self) -> int:
        """Reservations not yet settled or released."""
        return len(self._outstanding)

    async def load(self) -> None:
        """Restore the current hour's and day's windows from the store (once; later calls do
        nothing). Windows of earlier periods are dropped.

        Raises ``StateCorruptError`` when the stored document cannot be used (the daemon then
        cannot know today's spend and must not guess) and ``StateError`` when it cannot be
        read.
        """
        async with self._load_lock:
            if self._loaded:
                return
            doc = await self._store.load_doc(DOC_NAME)
            if doc is not None:
                self._restore(doc)
            self._loaded = True

    async def reserve(
        self,
        agent: str,
        run_id: str,
        usd: float,
        tokens: int,
        *,
        run_limit: LimitConfig | None = None,
        agent_day_limit: LimitConfig | None = None,
    ) -> Reservation:
        """Hold ``usd`` and ``tokens`` (a call's worst case) in every window of the call.

        ``run_limit`` and ``agent_day_limit`` replace the configured ``per_run`` and
        ``per_agent_day`` limits for this agent when given. Returns once the reservation is
        durable. Raises ``BudgetExceeded`` naming the first window it would not fit
        (``limit``: the limit, ``observed``: spent + reserved + this call), holding nothing;
        ``ValueError`` for a negative or non-finite amount; ``StateError`` from the store
        (the reservation is then dropped: a call is never made on an unrecorded reservation).
        """
        _check_amounts(usd, tokens)
        await self._ensure_loaded()
        # From here to the end of the bookkeeping there is no await: the check and the
        # addition are one step for every concurrent caller.
        nanos = _to_nanos(usd)
        held = self._applicable(agent, run_id, run_limit, agent_day_limit)
        for window, limit in held:
            _check(window, limit, nanos, tokens, usd)
        for window, limit in held:
            window.reserved += nanos
            window.reserved_tokens += tokens
            window.limit = limit
        reservation = Reservation(
            next(self._ids), agent, run_id, usd, tokens, tuple(w for w, _ in held)
        )
        self._outstanding[reservation.id] = reservation
        self._version += 1
        try:
            await self._persist(self._version)
        except BaseException:
            # Not durable (write failed, or the caller was cancelled): the call must not go.
            self._finish(reservation, None)
            raise
        return reservation

    async def settle(self, reservation: Reservation, usd: float, tokens: int) -> None:
        """Replace ``reservation`` by the actual cost (``usd``, ``tokens``) in its windows.

        A cost above the reservation is recorded in full and written before this returns;
        otherwise the write is lazy. Settling a reservation that is already settled or
        released does nothing. Raises ``ValueError`` for a negative or non-finite amount and
        ``StateError`` when a required write fails (the cost is still recorded in memory).
        """
        _check_amounts(usd, tokens)
        nanos = _to_nanos(usd)
        if not self._finish(reservation, (nanos, tokens)):
            return
        if nanos > _to_nanos(reservation.usd) or tokens > reservation.tokens:
            await self._persist(self._version)

    async def release(self, reservation: Reservation) -> None:
        """Drop ``reservation`` unused (the call was not made): ``settle`` with nothing spent."""
        await self.settle(reservation, 0.0, 0)

    def end_run(self, run_id: str) -> None:
        """Forget the run's window; its spend stays in the agent and global windows."""
        self._windows.pop((WindowKind.RUN, run_id), None)

    async def flush(self) -> None:
        """Write every change not yet in the store. Raises ``StateError`` when that fails."""
        if self._loaded:
            await self._persist(self._version)

    async def close(self) -> None:
        """Write pending settlements; the ledger may still be used afterwards."""
        await self.flush()

    def snapshot(self) -> list[WindowStatus]:
        """The current windows: the global ones always, then agents and open runs."""
        self._roll()
        self._window(WindowKind.GLOBAL_HOUR, _GLOBAL, self._hour)
        self._window(WindowKind.GLOBAL_DAY, _GLOBAL, self._day)
        order = list(WindowKind)[::-1]  # global_day, global_hour, agent_day, run
        windows = sorted(self._windows.values(), key=lambda w: (order.index(w.kind), w.key))
        out = []
        for window in windows:
            limit = self._limit_of(window)
            out.append(
                WindowStatus(
                    name=window.kind.value,
                    key=window.key,
                    spent_usd=window.spent / _NANO,
                    reserved_usd=window.reserved / _NANO,
                    limit_usd=limit.usd if limit else None,
                    spent_tokens=window.spent_tokens,
                    limit_tokens=limit.tokens if limit else None,
                    reserved_tokens=window.reserved_tokens,
                    period=window.period,
                )
            )
        return out

    # Bookkeeping: synchronous, so that each step is atomic for concurrent callers.

    def _applicable(
        self,
        agent: str,
        run_id: str,
        run_limit: LimitConfig | None,
        agent_day_limit: LimitConfig | None,
    ) -> list[tuple[_Window, LimitConfig]]:
        """The call's windows, most specific first, each with the limit that applies."""
        self._roll()
        limits = self.limits
        return [
            (
                self._window(WindowKind.RUN, run_id, None),
                run_limit if run_limit is not None else limits.per_run,
            ),
            (
                self._window(WindowKind.AGENT_DAY, agent, self._day),
                agent_day_limit if agent_day_limit is not None else limits.per_agent_day,
            ),
            (self._window(WindowKind.GLOBAL_HOUR, _GLOBAL, self._hour), limits.global_hour),
            (self._window(WindowKind.GLOBAL_DAY, _GLOBAL, self._day), limits.global_day),
        ]

    def _window(self, kind: WindowKind, key: str, period: str | None) -> _Window:
        window = self._windows.get((kind, key))
        if window is None:
            window = self._windows[(kind, key)] = _Window(kind, key, period)
        return window

    def _limit_of(self, window: _Window) -> LimitConfig | None:
        if window.kind is WindowKind.GLOBAL_HOUR:
            return self.limits.global_hour
        if window.kind is WindowKind.GLOBAL_DAY:
            return self.limits.global_day
        if window.limit is not None:
            return window.limit
        return self.limits.per_run if window.kind is WindowKind.RUN else self.limits.per_agent_day

    def _roll(self) -> None:
        """Move to the current hour and day, dropping the windows of earlier periods."""
        now = self._clock.now().astimezone(UTC)
        day, hour = now.strftime(_DAY), now.strftime(_HOUR)
        if hour <= self._hour:
            return  # same hour, or the wall clock went back: keep the newer windows
        self._day, self._hour = day, hour
        # Reservations still hold the dropped windows; settling them there is harmless.
        self._windows = {
            k: w
            for k, w in self._windows.items()
            if w.kind is WindowKind.RUN
            or w.period == (hour if w.kind is WindowKind.GLOBAL_HOUR else day)
        }
        self._version += 1

    def _finish(self, reservation: Reservation, actual: tuple[int, int] | None) -> bool:
        """Take ``reservation`` out of its windows, adding ``actual`` as spent; False when it
        was already finished."""
        if self._outstanding.pop(reservation.id, None) is None:
            return False
        nanos, tokens = actual or (0, 0)
        held = _to_nanos(reservation.usd)
        for window in reservation._windows:
            window.reserved -= held
            window.reserved_tokens -= reservation.tokens
            window.spent += nanos
            window.spent_tokens += tokens
        self._version += 1
        return True

    def _restore(self, raw: dict[str, object]) -> None:
        version = raw.get("version")
        if isinstance(version, int) and version > _DOC_VERSION:
            raise StateCorruptError(
                doc_subject(DOC_NAME),
                f"budget document version {version} is newer than this supervisor reads "
                f"({_DOC_VERSION})",
            )
        try:
            doc = _LedgerDoc.model_validate(raw)
        except ValidationError as exc:
            raise StateCorruptError(
                doc_subject(DOC_NAME), f"budget document does not match its schema: {exc}"
            ) from exc
        self._roll()
        try:
            ahead = datetime.strptime(doc.hour, _HOUR).replace(tzinfo=UTC) - datetime.strptime(
                self._hour, _HOUR
            ).replace(tzinfo=UTC)
        except ValueError as exc:
            raise StateCorruptError(
                doc_subject(DOC_NAME), f"budget document has an impossible hour {doc.hour!r}"
            ) from exc
        if timedelta(0) < ahead <= _CLOCK_BACK_TOLERANCE:
            # Written in a later period than the clock now says (the clock was set back across
            # a restart): keep counting in that period rather than forget its spend.
            self._day, self._hour = doc.day, doc.hour
        if doc.day == self._day:
            _add(self._window(WindowKind.GLOBAL_DAY, _GLOBAL, self._day), doc.global_day)
            for agent, spend in doc.agent_day.items():
                _add(self._window(WindowKind.AGENT_DAY, agent, self._day), spend)
        if doc.hour == self._hour:
            _add(self._window(WindowKind.GLOBAL_HOUR, _GLOBAL, self._hour), doc.global_hour)

    def _document(self) -> dict[str, object]:
        self._roll()

        def spend(window: _Window | None) -> dict[str, object]:
            if window is None:
                return {"usd": 0.0, "tokens": 0}
            # Outstanding reservations count as spent: after a crash they may have been billed.
            return {
                "usd": (window.spent + window.reserved) / _NANO,
                "tokens": window.spent_tokens + window.reserved_tokens,
            }

        return {
            "version": _DOC_VERSION,
            "updated_at": self._clock.now().astimezone(UTC).isoformat(),
            "day": self._day,
            "hour": self._hour,
            "global_day": spend(self._windows.get((WindowKind.GLOBAL_DAY, _GLOBAL))),
            "global_hour": spend(self._windows.get((WindowKind.GLOBAL_HOUR, _GLOBAL))),
            "agent_day": {
                w.key: spend(w) for w in self._windows.values() if w.kind is WindowKind.AGENT_DAY
            },
        }

    # Durability.

    async def _ensure_loaded(self) -> None:
        # Returns without yielding once loaded, keeping reserve()'s bookkeeping atomic.
        if not self._loaded:
            await self.load()

    async def _persist(self, version: int) -> None:
        """Return once a document at least as new as ``version`` is in the store.

        Group commit: one write at a time; whoever takes the lock next writes everything
        changed so far, and the callers it covered return without writing.
        """
        if self._durable >= version:
            return
        async with self._write_lock:
            if self._durable >= version:
                return
            target = self._version
            await self._store.commit_doc(DOC_NAME, self._document())
            self.writes += 1
            self._durable = max(self._durable, target)


def _to_nanos(usd: float) -> int:
    return round(usd * _NANO)


def _check_amounts(usd: float, tokens: int) -> None:
    if not usd >= 0 or math.isinf(usd):
        raise ValueError(f"usd must be a finite number >= 0, got {usd!r}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens!r}")


def _check(window: _Window, limit: LimitConfig, nanos: int, tokens: int, usd: float) -> None:
    """Raise ``BudgetExceeded`` when this call's worst case does not fit ``window``."""
    scope = window.key if window.period is None else f"{window.key}, {window.period}"
    where = f"{window.kind.value} budget ({scope})"
    if limit.usd is not None:
        observed = window.spent + window.reserved + nanos
        if observed > _to_nanos(limit.usd):
            raise BudgetExceeded(
                f"{where}: this call's worst case of ${usd:.6f} does not fit the USD limit",
                limit=limit.usd,
                observed=observed / _NANO,
            )
    if limit.tokens is not None:
        observed_tokens = window.spent_tokens + window.reserved_tokens + tokens
        if observed_tokens > limit.tokens:
            raise BudgetExceeded(
                f"{where}: this call's worst case of {tokens} tokens does not fit the token limit",
                limit=limit.tokens,
                observed=observed_tokens,
            )


def _add(window: _Window, spend: _Spend) -> None:
    window.spent += _to_nanos(spend.usd)
    window.spent_tokens += spend.tokens
