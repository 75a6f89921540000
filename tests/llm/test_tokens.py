"""Token estimates, per-model calibration, and fitting messages into a context window."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from supervisor.errors import CallRefused
from supervisor.llm.base import Message
from supervisor.llm.tokens import Calibrator, estimate_tokens, fit_context, omitted_note


def sys(text: str = "You are terse.") -> Message:
    """A system message."""
    return Message("system", text)


def user(text: str) -> Message:
    """A user message."""
    return Message("user", text)


def bot(text: str) -> Message:
    """An assistant message."""
    return Message("assistant", text)


def count(messages: Sequence[Message]) -> int:
    """A transparent estimate for fitting tests: 10 per message plus 1 per character."""
    return sum(10 + len(m.content) for m in messages)


# estimate_tokens


def test_estimate_is_four_characters_per_token_plus_overhead() -> None:
    """ASCII text counts ceil(chars / 4) + 4 per message + 3 for the reply."""
    assert estimate_tokens([user("a" * 400)]) == 3 + 4 + 100
    assert estimate_tokens([sys("abc"), user("a" * 5)]) == 3 + (4 + 1) + (4 + 2)
    assert estimate_tokens([]) == 3


def test_non_ascii_text_is_counted_in_utf8_bytes() -> None:
    """CJK text (3 bytes a character) is not underestimated fourfold."""
    text = "世界" * 100  # 200 characters, 600 bytes
    assert estimate_tokens([user(text)]) == 3 + 4 + 150


def test_estimate_is_cheap_for_a_large_prompt() -> None:
    """A 4 MB prompt is estimated without a tokenizer, in one pass."""
    assert estimate_tokens([user("x" * 4_000_000)]) == 1_000_007


# Calibrator


def test_calibrator_starts_neutral_and_learns_the_ratio() -> None:
    """An unknown model uses the heuristic; reported usage moves the estimate toward reality."""
    cal = Calibrator(alpha=0.5)
    messages = [user("a" * 393)]  # heuristic: 3 + 4 + 99 = 106
    assert cal.estimate("m", messages) == 106
    cal.observe("m", cal.estimate("m", messages), 212)
    assert cal.ratio("m") == 2.0
    assert cal.estimate("m", messages) == 212
    assert cal.ratio("other") == 1.0


def test_calibrator_converges_when_fed_its_own_estimates() -> None:
    """Observing the calibrated estimate (not the raw one) still converges on the true ratio."""
    cal = Calibrator(alpha=0.3)
    messages = [user("a" * 1000)]
    raw = estimate_tokens(messages)
    for _ in range(30):
        cal.observe("m", cal.estimate("m", messages), round(raw * 1.6))
    assert cal.ratio("m") == pytest.approx(1.6, rel=0.01)


@pytest.mark.parametrize(("actual", "ratio"), [(10_000, 3.0), (1, 0.5)], ids=["high", "low"])
def test_calibrator_ratio_is_clamped(actual: int, ratio: float) -> None:
    """One absurd report cannot push the ratio beyond [0.5, 3]."""
    cal = Calibrator()
    cal.observe("m", 100, actual)
    assert cal.ratio("m") == ratio


def test_calibrator_ignores_unusable_reports() -> None:
    """A zero estimate or a negative count teaches nothing."""
    cal = Calibrator()
    cal.observe("m", 0, 100)
    cal.observe("m", 100, -1)
    assert cal.ratio("m") == 1.0


@pytest.mark.parametrize(
    "kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"low": 0.0}, {"low": 2.0, "high": 1.0}]
)
def test_calibrator_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    """Alpha outside (0, 1] or bounds not 0 < low <= high are a ValueError."""
    with pytest.raises(ValueError):
        Calibrator(**kwargs)


# fit_context

A1, U2, A2 = bot("1" * 40), user("2" * 40), bot("3" * 40)
CONVERSATION = (
    sys("S"),  # 11
    user("task"),  # 14
    A1,  # 50
    U2,  # 50
    A2,  # 50
    user("last"),  # 14
)  # total 189; the note "[N earlier messages omitted]" costs 38


def test_messages_that_fit_are_returned_unchanged() -> None:
    """When the estimate plus max_tokens fits, nothing is dropped."""
    assert fit_context(CONVERSATION, context=200, max_tokens=11, estimate=count) == (
        CONVERSATION,
        0,
    )


def test_drop_middle_keeps_system_task_and_newest_turns() -> None:
    """The oldest turns after the first user message go first, replaced by one note."""
    # Room 130: dropping A1 and U2 (100) and adding the note (38) leaves 127.
    kept, dropped = fit_context(
        CONVERSATION, context=150, max_tokens=20, strategy="drop_middle", estimate=count
    )
    assert (kept, dropped) == ((sys("S"), user("task"), omitted_note(2), A2, user("last")), 2)


def test_note_is_left_out_when_only_the_bare_minimum_fits() -> None:
    """When system + note + last is too long but system + last fits, the note is left out."""
    kept, dropped = fit_context(
        CONVERSATION, context=100, max_tokens=50, strategy="drop_middle", estimate=count
    )
    assert (kept, dropped) == ((sys("S"), user("last")), 4)


def test_drop_middle_drops_the_fewest_messages() -> None:
    """Only as many middle messages go as needed, oldest first, in one run with one note."""
    long_middle = (
        sys("S"),
        user("task"),
        *[bot(f"old-{i}") for i in range(10)],
        user("last"),
    )
    budget = count(long_middle) - 30
    kept, dropped = fit_context(
        long_middle, context=budget + 10, max_tokens=10, strategy="drop_middle", estimate=count
    )
    note = omitted_note(dropped)
    assert kept == (sys("S"), user("task"), note, *long_middle[2 + dropped :])
    assert count(kept) <= budget
    # One fewer drop would not fit.
    fewer = (sys("S"), user("task"), omitted_note(dropped - 1), *long_middle[1 + dropped :])
    assert count(fewer) > budget


def test_drop_middle_keeps_system_messages_anywhere() -> None:
    """System messages in the middle are never dropped."""
    messages = (sys("S"), user("task"), bot("x" * 50), sys("mid"), bot("y" * 50), user("last"))
    kept, dropped = fit_context(messages, context=120, max_tokens=0, estimate=count)
    assert dropped == 2
    assert kept == (sys("S"), user("task"), omitted_note(2), sys("mid"), user("last"))


def test_drop_middle_drops_the_task_as_a_last_resort() -> None:
    """When even system + task + last do not fit, the task goes too."""
    messages = (sys("S"), user("t" * 100), bot("a"), user("last"))
    kept, dropped = fit_context(messages, context=80, max_tokens=0, estimate=count)
    assert dropped == 2
    assert kept == (sys("S"), omitted_note(2), user("last"))


def test_truncate_oldest_drops_from_the_start_without_a_note() -> None:
    """``truncate_oldest`` drops the oldest non-system messages first, the task included."""
    kept, dropped = fit_context(
        CONVERSATION, context=100, max_tokens=10, strategy="truncate_oldest", estimate=count
    )
    assert (kept, dropped) == ((sys("S"), A2, user("last")), 3)


def test_refuse_strategy_refuses_instead_of_dropping() -> None:
    """``refuse`` raises CallRefused("context") when the messages do not fit."""
    with pytest.raises(CallRefused, match="context strategy: refuse") as caught:
        fit_context(CONVERSATION, context=60, max_tokens=10, strategy="refuse", estimate=count)
    assert caught.value.reason == "context"


@pytest.mark.parametrize("strategy", ["drop_middle", "truncate_oldest"])
def test_refused_when_even_system_and_last_do_not_fit(strategy: str) -> None:
    """If the system messages and the last message alone exceed the room, the call is refused."""
    messages = (sys("S" * 50), user("a"), user("last" * 20))
    with pytest.raises(CallRefused, match="even the system messages") as caught:
        fit_context(
            messages,
            context=100,
            max_tokens=10,
            strategy=strategy,  # type: ignore[arg-type]
            estimate=count,
        )
    assert caught.value.reason == "context"


def test_max_tokens_alone_larger_than_the_context_is_refused() -> None:
    """An answer budget bigger than the window cannot fit whatever is dropped."""
    with pytest.raises(CallRefused):
        fit_context([user("hi")], context=100, max_tokens=200, estimate=count)


def test_default_estimate_is_the_heuristic() -> None:
    """Without an ``estimate``, ``estimate_tokens`` decides."""
    messages = [sys("S"), user("a" * 4000), bot("b" * 4000), user("last")]
    kept, dropped = fit_context(messages, context=1100, max_tokens=0)
    assert dropped == 1
    assert estimate_tokens(kept) <= 1100


def test_invalid_sizes_are_rejected() -> None:
    """A context below 1 or a negative max_tokens is a ValueError."""
    with pytest.raises(ValueError):
        fit_context([user("x")], context=0, max_tokens=1)
    with pytest.raises(ValueError):
        fit_context([user("x")], context=10, max_tokens=-1)
