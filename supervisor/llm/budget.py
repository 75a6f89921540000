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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supervisor.clock import Clock
from supervisor.errors import StateCorruptError
from supervisor.llm.config import BudgetsConfig, LimitConfig
from supervisor.llm.windows import (
    GLOBAL,
    HOUR,
    NANO,
    Window,
    WindowKind,
    WindowStatus,
    check_amounts,
    check_fits,
    is_current,
    periods,
    report,
    shared_windows,
    to_nanos,
)
from supervisor.state.base import StateStore
from supervisor.state.jsonfile import doc_subject

__all__ = ["DOC_NAME", "BudgetLedger", "Reservation", "WindowKind", "WindowStatus"]

#: the store document that holds the persisted windows
DOC_NAME = "budget"
_DOC_VERSION = 1
#: how far ahead of the clock a stored period may be and still be kept (see ``_restore``)
_CLOCK_BACK_TOLERANCE = timedelta(days=1)


@dataclass(frozen=True, slots=True, eq=False)
class Reservation:
    """A worst case held in every window of one call until ``settle`` or ``release``."""

    id: int
    agent: str
    run_id: str
    usd: float
    tokens: int
    #: the windows it is held in; a window that has since closed is updated harmlessly
    _windows: tuple[Window, ...] = field(default=(), repr=False)


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
        self._windows: dict[tuple[WindowKind, str], Window] = {}
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
        check_amounts(usd, tokens)
        await self._ensure_loaded()
        # From here to the end of the bookkeeping there is no await: the check and the
        # addition are one step for every concurrent caller.
        nanos = to_nanos(usd)
        held = self._applicable(agent, run_id, run_limit, agent_day_limit)
        for window, limit in held:
            check_fits(window, limit, nanos, tokens, usd)
        for window, limit in held:
            window.hold(nanos, tokens, limit)
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
        check_amounts(usd, tokens)
        nanos = to_nanos(usd)
        if not self._finish(reservation, (nanos, tokens)):
            return
        if nanos > to_nanos(reservation.usd) or tokens > reservation.tokens:
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
        self._window(WindowKind.GLOBAL_HOUR, GLOBAL, self._hour)
        self._window(WindowKind.GLOBAL_DAY, GLOBAL, self._day)
        return report(self._windows.values(), self.limits)

    # Bookkeeping: synchronous, so that each step is atomic for concurrent callers.

    def _applicable(
        self,
        agent: str,
        run_id: str,
        run_limit: LimitConfig | None,
        agent_day_limit: LimitConfig | None,
    ) -> list[tuple[Window, LimitConfig]]:
        """The call's windows, most specific first, each with the limit that applies."""
        self._roll()
        limits = self.limits
        return [
            (
                self._window(WindowKind.RUN, run_id, None),
                run_limit if run_limit is not None else limits.per_run,
            ),
            *shared_windows(self._window, agent, self._day, self._hour, limits, agent_day_limit),
        ]

    def _window(self, kind: WindowKind, key: str, period: str | None) -> Window:
        window = self._windows.get((kind, key))
        if window is None:
            window = self._windows[(kind, key)] = Window(kind, key, period)
        return window

    def _roll(self) -> None:
        """Move to the current hour and day, dropping the windows of earlier periods."""
        day, hour = periods(self._clock)
        if hour <= self._hour:
            return  # same hour, or the wall clock went back: keep the newer windows
        self._day, self._hour = day, hour
        # Reservations still hold the dropped windows; settling them there is harmless.
        self._windows = {k: w for k, w in self._windows.items() if is_current(w, day, hour)}
        self._version += 1

    def _finish(self, reservation: Reservation, actual: tuple[int, int] | None) -> bool:
        """Take ``reservation`` out of its windows, adding ``actual`` as spent; False when it
        was already finished."""
        if self._outstanding.pop(reservation.id, None) is None:
            return False
        nanos, tokens = actual or (0, 0)
        held = to_nanos(reservation.usd)
        for window in reservation._windows:
            window.settle(held, reservation.tokens, nanos, tokens)
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
            ahead = datetime.strptime(doc.hour, HOUR).replace(tzinfo=UTC) - datetime.strptime(
                self._hour, HOUR
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
            _add(self._window(WindowKind.GLOBAL_DAY, GLOBAL, self._day), doc.global_day)
            for agent, spend in doc.agent_day.items():
                _add(self._window(WindowKind.AGENT_DAY, agent, self._day), spend)
        if doc.hour == self._hour:
            _add(self._window(WindowKind.GLOBAL_HOUR, GLOBAL, self._hour), doc.global_hour)

    def _document(self) -> dict[str, object]:
        self._roll()

        def spend(window: Window | None) -> dict[str, object]:
            if window is None:
                return {"usd": 0.0, "tokens": 0}
            # Outstanding reservations count as spent: after a crash they may have been billed.
            return {
                "usd": (window.spent + window.reserved) / NANO,
                "tokens": window.spent_tokens + window.reserved_tokens,
            }

        return {
            "version": _DOC_VERSION,
            "updated_at": self._clock.now().astimezone(UTC).isoformat(),
            "day": self._day,
            "hour": self._hour,
            "global_day": spend(self._windows.get((WindowKind.GLOBAL_DAY, GLOBAL))),
            "global_hour": spend(self._windows.get((WindowKind.GLOBAL_HOUR, GLOBAL))),
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


def _add(window: Window, spend: _Spend) -> None:
    window.spent += to_nanos(spend.usd)
    window.spent_tokens += spend.tokens
