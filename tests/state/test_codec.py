"""The stored form of a record: what ``encode_state`` checks without parsing its own output."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from supervisor.errors import StateWriteError
from supervisor.state.base import AgentState, LastRun
from supervisor.state.codec import FLOAT_FIELDS, decode_state, encode_state

AT = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def test_float_fields_of_the_schema_are_known() -> None:
    """``encode_state`` checks these paths for NaN and infinity instead of parsing the record
    back: a new float field in the schema shows up here, and is checked from then on."""
    assert FLOAT_FIELDS == (("last_run", "duration_s"),)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_duration_is_refused_where_json_would_write_null(value: float) -> None:
    """orjson writes NaN and infinity as ``null``, which the schema refuses: never written."""
    state = AgentState(
        agent="alpha",
        last_run=LastRun(
            run_id="r", outcome="success", started_at=AT, finished_at=AT, duration_s=1.0,
            steps=0, attempts=1,
        ),
    )  # fmt: skip
    assert state.last_run is not None
    state.last_run.duration_s = value
    with pytest.raises(StateWriteError, match=r"last_run\.duration_s: .* is not a finite number"):
        encode_state(state)


def test_what_is_encoded_decodes_to_the_same_record() -> None:
    """The bytes ``encode_state`` returns load back as an equal record."""
    state = AgentState(agent="alpha", data={"nan-free": [1, 2.5, "x"]}, totals={"success": 3})
    assert decode_state("alpha", encode_state(state), "test") == state
