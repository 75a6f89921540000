"""Max-steps guard: bound the number of steps (LLM calls, tool calls) one run may take."""

from __future__ import annotations

from collections import Counter

from supervisor.errors import MaxStepsExceeded

# Step names can be built from data (a URL, a tool argument); past this many distinct names
# the rest are tallied together so the tally stays small enough to log.
MAX_TALLY_NAMES = 32
OTHER_NAME = "<other>"


class StepCounter:
    """Counts the steps of one run against an optional limit (None means unlimited).

    Raises ``ValueError`` on a negative limit.
    """

    __slots__ = ("_count", "_last_name", "_limit", "_tally")

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        self._limit = limit
        self._count = 0
        self._last_name: str | None = None
        self._tally: Counter[str] = Counter()

    @property
    def limit(self) -> int | None:
        """The configured limit, or None when unlimited."""
        return self._limit

    @property
    def count(self) -> int:
        """Steps taken so far; never more than the limit."""
        return self._count

    @property
    def last_name(self) -> str | None:
        """The name of the last step taken, or None before the first."""
        return self._last_name

    @property
    def tally(self) -> dict[str, int]:
        """Steps taken per name (a copy), rare names past the first few under ``<other>``."""
        return dict(self._tally)

    def step(self, name: str) -> int:
        """Take one step and return its 1-based number.

        Raises ``MaxStepsExceeded`` when the step would pass the limit; the step is then not
        counted, so ``count`` stays equal to the limit.
        """
        if self._limit is not None and self._count >= self._limit:
            raise MaxStepsExceeded(
                f"step {name!r} is past the max-steps limit",
                limit=self._limit,
                observed=self._limit + 1,
            )
        self._count += 1
        self._last_name = name
        key = name if name in self._tally or len(self._tally) < MAX_TALLY_NAMES else OTHER_NAME
        self._tally[key] += 1
        return self._count
