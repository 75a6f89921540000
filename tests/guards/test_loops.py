"""Loop and stall detectors: when they fire, when they must not, and what they report."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from supervisor.guards.loops import (
    Detection,
    DetectorMode,
    LoopGuards,
    LoopPolicy,
    ProgressDetector,
    ProgressPolicy,
    RepeatDetector,
    RepeatPolicy,
    StallDetector,
    StallPolicy,
    fingerprint,
)
from supervisor.testing import FakeClock

ENFORCE, WARN, OFF = DetectorMode.ENFORCE, DetectorMode.WARN, DetectorMode.OFF


def calls(
    detector: RepeatDetector, kind: str, fp: str, n: int, response: str | None = None
) -> list[Detection | None]:
    """Make ``n`` calls the way a caller does: ask first, record only the calls made."""
    out = []
    for _ in range(n):
        detection = detector.before_call(kind, fp)
        out.append(detection)
        if detection is None or not detection.enforced:
            detector.after_call(kind, fp, response)
    return out


def policy(
    repeat: RepeatPolicy | None = None,
    no_progress: ProgressPolicy | None = None,
    stall: StallPolicy | None = None,
) -> LoopPolicy:
    """Only the given detectors on."""
    off = LoopPolicy.disabled()
    return LoopPolicy(repeat or off.repeat, no_progress or off.no_progress, stall or off.stall)


# -- fingerprint -----------------------------------------------------------------------------------


class _Msg(BaseModel):
    role: str
    content: str


def test_fingerprint_is_16_hex_and_stable_across_key_order() -> None:
    """Same parts give the same 16-hex-digit fingerprint, whatever the dict key order."""
    a = fingerprint("fast", [{"role": "user", "content": "hi"}], {"t": 0.2, "max": 10})
    b = fingerprint("fast", [{"content": "hi", "role": "user"}], {"max": 10, "t": 0.2})
    assert a == b
    assert len(a) == 16
    int(a, 16)


def test_fingerprint_tells_different_parts_apart() -> None:
    """Any differing part changes the fingerprint, including the order of parts."""
    prints = {
        fingerprint("GET", "https://x/a", b""),
        fingerprint("GET", "https://x/b", b""),
        fingerprint("POST", "https://x/a", b""),
        fingerprint("GET", "https://x/a", b"body"),
        fingerprint("https://x/a", "GET", b""),
    }
    assert len(prints) == 5


def test_fingerprint_accepts_bytes_models_and_other_objects() -> None:
    """Bytes are hashed, pydantic models dumped, other objects stand in by repr."""
    assert fingerprint(_Msg(role="user", content="hi")) == fingerprint(
        {"role": "user", "content": "hi"}
    )
    assert fingerprint(b"abc") == fingerprint(bytearray(b"abc"))
    assert fingerprint({1, 2}) == fingerprint({1, 2})


# -- repeat ----------------------------------------------------------------------------------------


def test_repeat_fires_at_exactly_max_repeats_plus_one_in_a_row() -> None:
    """With max_repeats 3 the first three identical calls pass and the fourth is refused."""
    detector = RepeatDetector(3, None, FakeClock())
    results = calls(detector, "llm", "fp-a", 4)
    assert results[:3] == [None, None, None]
    detection = results[3]
    assert detection is not None and detection.enforced
    assert (detection.detector, detection.outcome) == ("repeat", "loop_detected")
    assert (detection.limit, detection.observed) == (3, 4)


def test_repeat_refusal_is_sticky_in_enforce_mode() -> None:
    """A refused call asked for again is refused again (the agent swallowed the error)."""
    detector = RepeatDetector(2, None, FakeClock())
    calls(detector, "llm", "fp-a", 2)
    assert all(d is not None and d.enforced for d in calls(detector, "llm", "fp-a", 3))


def test_repeat_different_args_reset_the_streak() -> None:
    """A call with another fingerprint in between starts the count again."""
    detector = RepeatDetector(3, None, FakeClock())
    for _ in range(5):
        assert calls(detector, "llm", "fp-a", 3) == [None] * 3
        assert calls(detector, "llm", "fp-b", 1) == [None]


def test_repeat_streak_is_per_kind() -> None:
    """An HTTP call between two identical LLM calls does not break the LLM streak."""
    detector = RepeatDetector(2, None, FakeClock())
    assert calls(detector, "llm", "fp-a", 1) == [None]
    assert calls(detector, "http", "fp-h", 1) == [None]
    assert calls(detector, "llm", "fp-a", 1) == [None]
    assert calls(detector, "effect", "fp-e", 1) == [None]
    detection = detector.before_call("llm", "fp-a")
    assert detection is not None and detection.evidence["kind"] == "llm"


def test_repeat_window_catches_interleaved_repeats() -> None:
    """In window mode, identical calls that are not in a row still count within the window."""
    clock = FakeClock()
    detector = RepeatDetector(2, 60.0, clock)
    for fp in ("a", "b", "a", "b"):
        assert detector.before_call("llm", fp) is None
        detector.after_call("llm", fp)
        clock.advance(10)
    detection = detector.before_call("llm", "a")
    assert detection is not None
    assert detection.evidence["rule"] == "window"
    assert detection.evidence["window_s"] == 60.0
    assert detection.observed == 3


def test_repeat_window_forgets_calls_older_than_the_window() -> None:
    """Interleaved repeats spread wider than the window never fire."""
    clock = FakeClock()
    detector = RepeatDetector(2, 60.0, clock)
    for _ in range(10):
        for fp in ("a", "b"):
            assert detector.before_call("llm", fp) is None
            detector.after_call("llm", fp)
            clock.advance(31)


def test_repeat_in_a_row_fires_even_when_slower_than_the_window() -> None:
    """The in-a-row rule holds whatever the window: a slow loop is still a loop."""
    clock = FakeClock()
    detector = RepeatDetector(2, 10.0, clock)
    for _ in range(2):
        assert detector.before_call("http", "a") is None
        detector.after_call("http", "a", "same")
        clock.advance(100)
    detection = detector.before_call("http", "a")
    assert detection is not None and detection.evidence["rule"] == "in_a_row"


def test_repeat_polling_get_with_different_responses_never_fires() -> None:
    """A poll that keeps getting new responses is not a loop, in a row or in the window."""
    clock = FakeClock()
    detector = RepeatDetector(2, 60.0, clock)
    for n in range(200):
        assert detector.before_call("http", "GET /status") is None
        detector.after_call("http", "GET /status", fingerprint("status", n))
        clock.advance(1)


def test_repeat_polling_get_with_identical_responses_fires() -> None:
    """The same GET answered the same way max_repeats times is refused the next time."""
    detector = RepeatDetector(3, None, FakeClock())
    results = calls(detector, "http", "GET /status", 4, response="r-pending")
    assert results[:3] == [None] * 3
    detection = results[3]
    assert detection is not None
    assert detection.evidence["response_fingerprint"] == "r-pending"
    assert "same response" in detection.message


def test_repeat_new_response_restarts_the_streak() -> None:
    """After a changed response the same request may repeat max_repeats times again."""
    detector = RepeatDetector(3, None, FakeClock())
    for response in ("r1", "r1", "r2", "r2", "r2"):
        assert detector.before_call("http", "GET") is None
        detector.after_call("http", "GET", response)
    detection = detector.before_call("http", "GET")
    assert detection is not None
    assert detection.evidence["response_fingerprint"] == "r2"


def test_repeat_evidence_names_kind_fingerprint_count_and_rule() -> None:
    """The detection carries what an operator needs to find the looping call."""
    detector = RepeatDetector(2, None, FakeClock())
    detection = calls(detector, "effect", "fp-mail", 3)[2]
    assert detection is not None
    assert detection.evidence == {
        "kind": "effect",
        "fingerprint": "fp-mail",
        "count": 3,
        "rule": "in_a_row",
    }
    assert "effect" in detection.message and "fp-mail" in detection.message


def test_repeat_warn_mode_warns_once_per_streak() -> None:
    """In warn mode the calls go on, one non-enforced detection per streak."""
    detector = RepeatDetector(2, None, FakeClock(), mode=WARN)
    first = calls(detector, "llm", "a", 10)
    warnings = [d for d in first if d is not None]
    assert len(warnings) == 1 and not warnings[0].enforced
    assert first.index(warnings[0]) == 2
    calls(detector, "llm", "b", 1)
    again = [d for d in calls(detector, "llm", "a", 10) if d is not None]
    assert len(again) == 1


def test_repeat_warn_mode_window_warns_once_until_the_pair_ages_out() -> None:
    """An interleaved loop in warn mode warns once, not on every call of the loop."""
    clock = FakeClock()
    detector = RepeatDetector(2, 100.0, clock, mode=WARN)
    seen = []
    for _ in range(10):
        for fp in ("a", "b"):
            seen.append(detector.before_call("llm", fp))
            detector.after_call("llm", fp)
            clock.advance(1)
    assert [d.evidence["fingerprint"] for d in seen if d is not None] == ["a", "b"]
    clock.advance(200)
    assert calls(detector, "llm", "a", 3)[2] is not None


def test_repeat_off_mode_never_fires() -> None:
    """A detector that is off lets every call through."""
    detector = RepeatDetector(1, 10.0, FakeClock(), mode=OFF)
    assert calls(detector, "llm", "a", 50) == [None] * 50


@pytest.mark.parametrize(
    ("max_repeats", "window"),
    [(0, None), (-1, None), (True, None), (2, -1.0), (2, float("nan"))],
    ids=["zero", "negative", "bool", "negative-window", "nan-window"],
)
def test_repeat_rejects_invalid_bounds(max_repeats: Any, window: float | None) -> None:
    """Bad bounds raise ValueError at construction."""
    with pytest.raises(ValueError):
        RepeatDetector(max_repeats, window, FakeClock())


# -- no progress -----------------------------------------------------------------------------------


def test_no_progress_fires_after_max_idle_empty_steps() -> None:
    """An agent spinning on one step name with nothing changing is stopped at the Nth idle step."""
    detector = ProgressDetector(3)
    state: dict[str, Any] = {"cursor": 1}
    results = [detector.on_step("spin", state) for _ in range(4)]
    assert results[:3] == [None, None, None]  # the first step is new; then idle 1, 2
    detection = results[3]
    assert detection is not None and detection.enforced
    assert (detection.detector, detection.outcome) == ("no_progress", "loop_detected")
    assert (detection.limit, detection.observed) == (3, 3)


@pytest.mark.parametrize(
    "write",
    [
        lambda state, i: state.__setitem__("cursor", i),
        lambda state, i: state["items"].append(i),
        lambda state, i: state["nested"].update({str(i): i}),
    ],
    ids=["top-level", "nested-append", "nested-update"],
)
def test_no_progress_batch_loop_writing_state_never_fires(write: Any) -> None:
    """A batch loop whose steps each write new state, at any depth, is making progress."""
    detector = ProgressDetector(2)
    state: dict[str, Any] = {"cursor": 0, "items": [], "nested": {}}
    for i in range(200):
        assert detector.on_step("item", state) is None
        write(state, i)


def test_no_progress_new_step_names_count_as_progress() -> None:
    """Each step with a name not seen before in the run is progress."""
    detector = ProgressDetector(2)
    for i in range(100):
        assert detector.on_step(f"page-{i}", {}) is None


def test_no_progress_rewriting_the_same_value_is_not_progress() -> None:
    """Writing back what was already there changes nothing."""
    detector = ProgressDetector(2)
    state = {"cursor": 7}
    results = []
    for _ in range(3):
        results.append(detector.on_step("sync", state))
        state["cursor"] = 7
    assert results[2] is not None


def test_no_progress_new_output_counts_and_a_repeated_one_does_not() -> None:
    """A new LLM output is progress; the same output again is not."""
    detector = ProgressDetector(2)
    assert detector.on_step("ask", {}) is None
    detector.note(("llm", "out-1"), "llm_output")
    assert detector.on_step("ask", {}) is None
    detector.note(("llm", "out-1"), "llm_output")
    assert detector.on_step("ask", {}) is None  # idle 1
    detector.note(("llm", "out-1"), "llm_output")
    assert detector.on_step("ask", {}) is not None  # idle 2


def test_no_progress_without_state_uses_the_other_signals() -> None:
    """With no state given, names and noted outputs still decide."""
    detector = ProgressDetector(2)
    assert detector.on_step("a") is None
    assert detector.on_step("a") is None
    assert detector.on_step("a") is not None


def test_no_progress_unserialisable_state_never_fires() -> None:
    """A state it cannot read is given the benefit of the doubt."""
    detector = ProgressDetector(1)
    state = {"obj": object()}
    for _ in range(10):
        assert detector.on_step("x", state) is None


def test_no_progress_evidence_lists_idle_steps_and_last_progress() -> None:
    """The detection says how many steps were idle, which, and what last moved."""
    detector = ProgressDetector(3)
    state: dict[str, Any] = {"page": 1}
    for name in ("fetch", "parse", "fetch", "parse"):
        assert detector.on_step(name, state) is None
    detection = detector.on_step("fetch", state)
    assert detection is not None
    assert detection.evidence == {
        "idle_steps": 3,
        "steps": ["fetch", "parse", "fetch"],
        "step": 5,
        "last_progress_step": 2,
        "last_progress": "step_name",
    }


def test_no_progress_spin_after_a_state_write_fires_within_twice_the_limit() -> None:
    """State is compared every max_idle_steps idle steps, so a write is credited late, never missed."""
    detector = ProgressDetector(3)
    state: dict[str, Any] = {}
    assert detector.on_step("spin", state) is None
    state["done"] = True
    results = [detector.on_step("spin", state) for _ in range(6)]
    assert results[:5] == [None] * 5
    detection = results[5]
    assert detection is not None
    assert detection.evidence["last_progress"] == "state"
    assert detection.evidence["last_progress_step"] == 4


def test_no_progress_warn_mode_warns_once_per_idle_streak() -> None:
    """In warn mode one non-enforced detection per run of idle steps; progress re-arms it."""
    detector = ProgressDetector(2, mode=WARN)
    state: dict[str, Any] = {"n": 0}
    first = [detector.on_step("spin", state) for _ in range(20)]
    warnings = [d for d in first if d is not None]
    assert len(warnings) == 1 and not warnings[0].enforced
    state["n"] = 1
    again = [detector.on_step("spin", state) for _ in range(20)]
    assert len([d for d in again if d is not None]) == 1


def test_no_progress_off_mode_never_fires() -> None:
    """A detector that is off never fires."""
    detector = ProgressDetector(1, mode=OFF)
    assert all(detector.on_step("spin", {}) is None for _ in range(50))


# -- stall -----------------------------------------------------------------------------------------


def test_stall_fires_after_max_silence_and_not_before() -> None:
    """Silence up to just under max_silence is fine; at max_silence the run is stalled."""
    clock = FakeClock()
    detector = StallDetector(30.0, clock)
    assert detector.deadline() == clock.monotonic() + 30.0
    clock.advance(29.9)
    assert detector.check() is None
    clock.advance(0.1)
    detection = detector.check()
    assert detection is not None and detection.enforced
    assert (detection.detector, detection.outcome) == ("stall", "stalled")
    assert (detection.limit, detection.observed) == (30.0, 30.0)


def test_stall_does_not_fire_while_steps_continue() -> None:
    """A run that keeps taking steps (each within max_silence) is never stalled."""
    clock = FakeClock()
    detector = StallDetector(30.0, clock)
    for n in range(100):
        clock.advance(20)
        assert detector.check() is None
        detector.touch("step", f"s{n}")
        assert detector.deadline() == clock.monotonic() + 30.0


def test_stall_evidence_names_silence_and_last_activity() -> None:
    """The detection says how long it was silent and what happened last."""
    clock = FakeClock()
    detector = StallDetector(10.0, clock)
    detector.touch("call_start", "http")
    clock.advance(12.5)
    detection = detector.check()
    assert detection is not None
    assert detection.evidence == {
        "silent_s": 12.5,
        "last_activity": "call_start",
        "last_detail": "http",
    }


def test_stall_grace_allows_an_expected_silence() -> None:
    """A touch with grace (a retry backoff) moves the deadline past the backoff."""
    clock = FakeClock()
    detector = StallDetector(10.0, clock)
    detector.touch("retry_backoff", grace=50.0)
    clock.advance(59)
    assert detector.check() is None
    clock.advance(1)
    assert detector.check() is not None


def test_stall_warn_mode_warns_once_per_silence_and_moves_its_deadline() -> None:
    """In warn mode one warning per silence; the deadline moves on so a watchdog never spins."""
    clock = FakeClock()
    detector = StallDetector(10.0, clock, mode=WARN)
    warnings = []
    for _ in range(5):
        clock.advance(max(0.0, detector.deadline() - clock.monotonic()))
        warnings.append(detector.check())
        assert detector.deadline() > clock.monotonic()
    assert warnings[0] is not None and not warnings[0].enforced
    assert warnings[1:] == [None] * 4
    detector.touch("step", "again")
    clock.advance(10)
    assert detector.check() is not None


def test_stall_off_mode_never_fires() -> None:
    """A detector that is off never fires and has no deadline."""
    clock = FakeClock()
    detector = StallDetector(1.0, clock, mode=OFF)
    clock.advance(1000)
    assert detector.check() is None
    assert detector.deadline() == float("inf")


# -- LoopGuards ------------------------------------------------------------------------------------


def test_guards_off_never_fire() -> None:
    """With every detector off nothing fires and no watchdog is needed."""
    clock = FakeClock()
    guards = LoopGuards(LoopPolicy.disabled(), clock)
    for _ in range(100):
        assert guards.on_step("spin", {}) is None
        assert guards.before_call("llm", "a") is None
        guards.after_call("llm", "a", "out")
    clock.advance(10_000)
    assert guards.check_stall() is None
    assert not guards.watches_stalls
    assert guards.stall_deadline() == float("inf")


def test_guards_llm_repeat_ignores_differing_outputs() -> None:
    """The same LLM request asked again is a loop even when the answers differ."""
    guards = LoopGuards(policy(repeat=RepeatPolicy(max_repeats=2)), FakeClock())
    for n in range(2):
        assert guards.before_call("llm", "q") is None
        guards.after_call("llm", "q", f"answer-{n}")
    detection = guards.before_call("llm", "q")
    assert detection is not None and "response_fingerprint" not in detection.evidence


def test_guards_http_repeat_is_response_aware() -> None:
    """The same HTTP request with new responses each time passes."""
    guards = LoopGuards(policy(repeat=RepeatPolicy(max_repeats=2)), FakeClock())
    for n in range(20):
        assert guards.before_call("http", "GET") is None
        guards.after_call("http", "GET", f"body-{n}")


def test_guards_new_outputs_and_effects_are_progress_failures_are_not() -> None:
    """New LLM outputs, HTTP responses and effects reset the idle count; failed calls do not."""
    guards = LoopGuards(policy(no_progress=ProgressPolicy(ENFORCE, 2)), FakeClock())
    guards.on_step("work", {})
    for n in range(10):
        guards.before_call("llm", "q")
        guards.after_call("llm", "q", f"out-{n}")
        assert guards.on_step("work", {}) is None
        guards.before_call("effect", f"mail-{n}")
        guards.after_call("effect", f"mail-{n}")
        assert guards.on_step("work", {}) is None
    guards.before_call("effect", "mail-new")
    guards.after_call("effect", "mail-new", failed=True)
    assert guards.on_step("work", {}) is None  # idle 1
    guards.before_call("http", "GET")
    guards.after_call("http", "GET", "error-page", failed=True)
    detection = guards.on_step("work", {})
    assert detection is not None
    assert detection.evidence["last_progress"] == "effect"


def test_guards_stall_counts_calls_in_flight() -> None:
    """A call that started and never ended leaves the run silent; evidence says so."""
    clock = FakeClock()
    guards = LoopGuards(policy(stall=StallPolicy(ENFORCE, 30.0)), clock)
    assert guards.watches_stalls
    guards.on_step("fetch", {})
    clock.advance(5)
    assert guards.before_call("http", "GET /dead") is None
    assert guards.stall_deadline() == clock.monotonic() + 30.0
    clock.advance(30)
    detection = guards.check_stall()
    assert detection is not None
    assert detection.evidence["calls_in_flight"] == 1
    assert detection.evidence["last_activity"] == "call_start"


def test_guards_calls_starting_and_ending_keep_a_run_alive() -> None:
    """A run that takes no steps but keeps making calls is not stalled."""
    clock = FakeClock()
    guards = LoopGuards(policy(stall=StallPolicy(ENFORCE, 30.0)), clock)
    for n in range(50):
        clock.advance(20)
        assert guards.before_call("http", f"GET /{n}") is None
        clock.advance(20)
        guards.after_call("http", f"GET /{n}", "ok")
        assert guards.check_stall() is None


def test_guards_enforced_refusal_is_not_in_flight() -> None:
    """A refused call never started, so it does not count as in flight."""
    clock = FakeClock()
    guards = LoopGuards(
        policy(repeat=RepeatPolicy(max_repeats=1), stall=StallPolicy(ENFORCE, 10.0)), clock
    )
    guards.before_call("llm", "q")
    guards.after_call("llm", "q")
    assert guards.before_call("llm", "q") is not None
    clock.advance(10)
    detection = guards.check_stall()
    assert detection is not None and detection.evidence["calls_in_flight"] == 0


def test_guards_tripped_keeps_the_first_enforced_detection() -> None:
    """The first enforced detection is kept and reported once; later ones only come back."""
    reported: list[Detection] = []
    guards = LoopGuards(
        policy(repeat=RepeatPolicy(max_repeats=1), no_progress=ProgressPolicy(ENFORCE, 1)),
        FakeClock(),
        on_detection=reported.append,
    )
    guards.before_call("llm", "q")
    guards.after_call("llm", "q")
    first = guards.before_call("llm", "q")
    assert first is not None and guards.tripped is first
    guards.on_step("s", {})
    later = guards.on_step("s", {})
    assert later is not None and later.detector == "no_progress"
    assert guards.tripped is first
    assert reported == [first]


def test_guards_report_every_warning_and_never_trip_on_one() -> None:
    """Warnings go to the hook and leave ``tripped`` unset."""
    reported: list[Detection] = []
    clock = FakeClock()
    warn = LoopPolicy(RepeatPolicy(WARN, 1), ProgressPolicy(WARN, 1), StallPolicy(WARN, 5.0))
    guards = LoopGuards(warn, clock, on_detection=reported.append)
    for _ in range(3):
        guards.before_call("llm", "q")
        guards.after_call("llm", "q")
        guards.on_step("s", {})
    clock.advance(5)
    guards.check_stall()
    assert [d.detector for d in reported] == ["repeat", "no_progress", "stall"]
    assert guards.tripped is None


def test_guards_new_attempt_starts_afresh() -> None:
    """A retried attempt repeating the first attempt's calls is not a loop."""
    guards = LoopGuards(policy(repeat=RepeatPolicy(max_repeats=2)), FakeClock())
    for _ in range(3):
        for _ in range(2):
            assert guards.before_call("llm", "q") is None
            guards.after_call("llm", "q", "a")
        guards.new_attempt()


@pytest.mark.parametrize(
    "make",
    [
        lambda: RepeatPolicy(max_repeats=0),
        lambda: RepeatPolicy(window=-1.0),
        lambda: RepeatPolicy(mode="sometimes"),  # type: ignore[arg-type]
        lambda: ProgressPolicy(max_idle_steps=0),
        lambda: StallPolicy(max_silence=0.0),
        lambda: StallPolicy(max_silence=float("inf")),
    ],
    ids=["repeats-zero", "window-negative", "bad-mode", "idle-zero", "silence-zero", "silence-inf"],
)
def test_policies_reject_invalid_values(make: Any) -> None:
    """Invalid policy values raise ValueError when the policy is built (config time)."""
    with pytest.raises(ValueError):
        make()


def test_policies_normalise_mode_names_and_a_zero_window() -> None:
    """Config gives modes as strings and 0 for "no window"; the policy normalises both."""
    off: Any = "off"
    repeat = RepeatPolicy(mode=off, window=0.0)
    assert repeat.mode is OFF and repeat.window is None
    guards = LoopGuards(LoopPolicy(repeat, ProgressPolicy(off), StallPolicy(off)), FakeClock())
    assert guards.repeat is None and guards.no_progress is None and not guards.watches_stalls
