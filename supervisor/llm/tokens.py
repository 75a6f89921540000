"""Token estimates before a call, and fitting a conversation into a model's context window.

The budget guard reserves the worst case of every call before it is sent, so it needs a
prompt size without a network round trip and without a tokenizer dependency (which would be a
different one per provider anyway). ``estimate_tokens`` is a deliberately cheap heuristic:

    tokens ≈ ceil(size / 4) per message + 4 per message (role, delimiters) + 3 (reply priming)

where ``size`` is the character count for ASCII text and the UTF-8 byte count otherwise, so
that Chinese, Japanese or emoji-heavy text (about one token per character, not per four) is
not underestimated fourfold. Four characters per token is the usual figure for English prose;
code, markup and other languages differ, and ``Calibrator`` learns the remaining bias per model
from the usage providers report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from supervisor.errors import CallRefused
from supervisor.llm.base import Message

__all__ = ["Calibrator", "ContextStrategy", "estimate_tokens", "fit_context", "omitted_note"]

ContextStrategy = Literal["drop_middle", "truncate_oldest", "refuse"]

_CHARS_PER_TOKEN = 4
#: role marker and delimiters around each message in the chat formats
_MESSAGE_OVERHEAD = 4
#: the tokens that open the assistant's reply
_REPLY_PRIMING = 3


def _content_tokens(text: str) -> int:
    # isascii() is O(1) for str in CPython's compact representation; encode only when needed.
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return -(-size // _CHARS_PER_TOKEN)


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A fast estimate of the prompt tokens of ``messages`` (see the module docstring)."""
    return _REPLY_PRIMING + sum(_MESSAGE_OVERHEAD + _content_tokens(m.content) for m in messages)


class Calibrator:
    """Per-model correction of ``estimate_tokens`` from the input tokens providers report.

    Keeps an exponentially weighted moving average (weight ``alpha`` for the newest sample)
    of ``actual / heuristic estimate`` per model, clamped to ``[low, high]`` (0.5-3 by
    default) so that one odd response cannot make estimates absurd. Unknown models use 1.
    Raises ``ValueError`` for an alpha outside (0, 1] or bounds that are not 0 < low <= high.
    """

    __slots__ = ("_alpha", "_high", "_low", "_ratios")

    def __init__(self, *, alpha: float = 0.2, low: float = 0.5, high: float = 3.0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got low={low!r} high={high!r}")
        self._alpha, self._low, self._high = alpha, low, high
        self._ratios: dict[str, float] = {}

    def ratio(self, model: str) -> float:
        """The current correction factor for ``model`` (1.0 until something was observed)."""
        return self._ratios.get(model, 1.0)

    def estimate(self, model: str, messages: Sequence[Message]) -> int:
        """``estimate_tokens(messages)`` corrected by ``model``'s learned ratio, rounded up."""
        return math.ceil(estimate_tokens(messages) * self.ratio(model))

    def observe(self, model: str, estimated: int, actual: int) -> None:
        """Learn from one call: ``estimated`` is what ``estimate`` returned for its prompt,
        ``actual`` the input tokens the provider reported.

        The heuristic's own estimate is recovered by dividing out the current ratio, so the
        average converges on the true ratio instead of chasing its own corrections. Ignores
        non-positive estimates and negative counts.
        """
        if estimated <= 0 or actual < 0:
            return
        current = self.ratio(model)
        sample = self._clamp(actual * current / estimated)
        previous = self._ratios.get(model)
        # The first sample replaces the neutral 1.0 outright: no reason to trust it less.
        updated = sample if previous is None else previous + self._alpha * (sample - previous)
        self._ratios[model] = self._clamp(updated)

    def _clamp(self, value: float) -> float:
        return min(self._high, max(self._low, value))


def omitted_note(count: int) -> Message:
    """The system note that stands in for ``count`` dropped messages."""
    return Message("system", f"[{count} earlier messages omitted]")


def fit_context(
    messages: Sequence[Message],
    *,
    context: int,
    max_tokens: int,
    strategy: ContextStrategy = "drop_middle",
    estimate: Callable[[Sequence[Message]], int] = estimate_tokens,
) -> tuple[tuple[Message, ...], int]:
    """Drop messages until ``estimate(messages) + max_tokens <= context``.

    Returns the messages to send and how many were dropped (0: unchanged). System messages
    and the last message are always kept. ``drop_middle`` also keeps the first user message
    (the task) as long as possible, drops the oldest turns after it first, and puts one note
    ``[N earlier messages omitted]`` where they were; ``truncate_oldest`` drops the oldest
    non-system messages first, without a note. Raises ``CallRefused("context")`` for
    ``refuse`` when the messages do not fit, and for any strategy when even the system
    messages and the last message do not fit; ``ValueError`` for a context < 1 or a negative
    ``max_tokens``.
    """
    if context < 1 or max_tokens < 0:
        raise ValueError(f"need context >= 1 and max_tokens >= 0, got {context} and {max_tokens}")
    msgs = tuple(messages)
    room = context - max_tokens
    needed = estimate(msgs)
    if needed <= room:
        return msgs, 0
    if strategy == "refuse":
        raise CallRefused(
            "context",
            f"prompt of ~{needed} tokens + max_tokens {max_tokens} exceeds the context window "
            f"of {context} tokens (context strategy: refuse)",
        )
    order = _drop_order(msgs, strategy)
    note = strategy == "drop_middle"

    def build(count: int, *, with_note: bool = note) -> tuple[Message, ...]:
        return _without(msgs, set(order[:count]), with_note)

    # Fewest drops that fit: binary search, as dropping more never makes the prompt longer.
    lo, hi = 1, len(order)
    if hi == 0 or estimate(build(hi)) > room:
        bare = build(hi, with_note=False)
        if hi > 0 and estimate(bare) <= room:
            return bare, hi
        raise CallRefused(
            "context",
            f"even the system messages and the last message (~{estimate(bare)} tokens) + "
            f"max_tokens {max_tokens} exceed the context window of {context} tokens",
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(build(mid)) <= room:
            hi = mid
        else:
            lo = mid + 1
    return build(lo), lo


def _drop_order(msgs: tuple[Message, ...], strategy: ContextStrategy) -> list[int]:
    """Indices of the droppable messages, the first to go first."""
    last = len(msgs) - 1
    droppable = [i for i, m in enumerate(msgs) if m.role != "system" and i != last]
    if strategy != "drop_middle":
        return droppable
    first_user = next((i for i in droppable if msgs[i].role == "user"), None)
    if first_user is None:
        return droppable
    after = [i for i in droppable if i > first_user]
    before = [i for i in droppable if i < first_user]
    # The middle goes first (oldest turns first), then anything before the task, then the task.
    return [*after, *before, first_user]


def _without(msgs: tuple[Message, ...], dropped: set[int], note: bool) -> tuple[Message, ...]:
    out: list[Message] = []
    noted = not note or not dropped
    for i, message in enumerate(msgs):
        if i not in dropped:
            out.append(message)
        elif not noted:
            out.append(omitted_note(len(dropped)))
            noted = True
    return tuple(out)
