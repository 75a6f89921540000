"""Max-steps guard: the limit is exact and the counter never passes it."""

from __future__ import annotations

import pytest

from supervisor.errors import GuardError, MaxStepsExceeded
from supervisor.guards.steps import MAX_TALLY_NAMES, OTHER_NAME, StepCounter


def test_exactly_limit_steps_allowed() -> None:
    """Steps 1..limit succeed and return their numbers."""
    counter = StepCounter(limit=3)
    assert [counter.step("llm") for _ in range(3)] == [1, 2, 3]
    assert counter.count == 3


def test_step_past_limit_raises_with_limit_and_observed() -> None:
    """Step limit+1 raises MaxStepsExceeded naming the step, with limit and observed."""
    counter = StepCounter(limit=2)
    counter.step("a")
    counter.step("b")
    with pytest.raises(MaxStepsExceeded) as info:
        counter.step("fetch")
    assert isinstance(info.value, GuardError)
    assert info.value.limit == 2
    assert info.value.observed == 3
    assert "'fetch'" in str(info.value)


def test_count_stays_at_limit_after_guard_fires() -> None:
    """The refused step is not counted, however often it is retried."""
    counter = StepCounter(limit=1)
    counter.step("a")
    for _ in range(3):
        with pytest.raises(MaxStepsExceeded):
            counter.step("b")
    assert counter.count == 1
    assert counter.last_name == "a"
    assert counter.tally == {"a": 1}


def test_limit_zero_refuses_first_step() -> None:
    """A limit of 0 allows no step at all."""
    counter = StepCounter(limit=0)
    with pytest.raises(MaxStepsExceeded) as info:
        counter.step("a")
    assert (info.value.limit, info.value.observed) == (0, 1)
    assert counter.count == 0


def test_none_is_unlimited() -> None:
    """With no limit every step is counted."""
    counter = StepCounter(limit=None)
    for _ in range(10_000):
        counter.step("tool")
    assert counter.count == 10_000
    assert counter.limit is None


def test_negative_limit_rejected() -> None:
    """A negative limit is a ValueError."""
    with pytest.raises(ValueError, match="limit"):
        StepCounter(limit=-1)


def test_last_name_and_tally() -> None:
    """The last step's name is kept and steps are tallied per name."""
    counter = StepCounter(limit=None)
    assert counter.last_name is None
    for name in ["llm", "tool", "llm"]:
        counter.step(name)
    assert counter.last_name == "llm"
    assert counter.tally == {"llm": 2, "tool": 1}


def test_tally_is_bounded() -> None:
    """Past the cap of distinct names, new names are tallied under one bucket."""
    counter = StepCounter(limit=None)
    for i in range(MAX_TALLY_NAMES + 10):
        counter.step(f"fetch {i}")
    counter.step("fetch 0")
    tally = counter.tally
    assert len(tally) == MAX_TALLY_NAMES + 1
    assert tally[OTHER_NAME] == 10
    assert tally["fetch 0"] == 2
    assert sum(tally.values()) == counter.count


def test_tally_is_a_copy() -> None:
    """Changing the returned tally does not change the counter."""
    counter = StepCounter(limit=None)
    counter.step("a")
    counter.tally["a"] = 99
    assert counter.tally == {"a": 1}
