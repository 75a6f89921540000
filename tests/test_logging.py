"""JSON-lines logging: shape of each line, bound run context, redaction, stdlib routing."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import pytest
import structlog

from supervisor.logging import REDACTED, Redactor, bind_run, configure_logging, get_logger

SECRET = "hunter2-very-secret-value"


@pytest.fixture
def out() -> Iterator[io.BytesIO]:
    """A byte stream to log to; logging config and context are restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    structlog.contextvars.clear_contextvars()
    yield io.BytesIO()
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def lines(stream: io.BytesIO) -> list[dict[str, Any]]:
    """Parse every line as one JSON object; fail on blank or non-object lines."""
    raw = stream.getvalue()
    assert raw.endswith(b"\n")
    parsed = [orjson.loads(line) for line in raw.split(b"\n")[:-1]]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


@dataclass
class _Creds:
    user: str
    password: str


# --- line shape --------------------------------------------------------------------------


def test_one_json_object_per_line(out: io.BytesIO) -> None:
    """Each event is one line of JSON with event, level and an ISO UTC ts, even multi-line."""
    configure_logging(stream=out)
    log = get_logger(component="test")
    log.info("first", n=1)
    log.warning("second\nwith a newline")
    log.error("third", when=datetime(2026, 1, 1))
    events = lines(out)
    assert [e["event"] for e in events] == ["first", "second\nwith a newline", "third"]
    assert [e["level"] for e in events] == ["info", "warning", "error"]
    assert all(e["component"] == "test" for e in events)
    assert events[0]["n"] == 1
    for event in events:
        assert event["ts"].endswith("Z")
        assert datetime.fromisoformat(event["ts"]).utcoffset() is not None


def test_level_filters_lower_levels(out: io.BytesIO) -> None:
    """Below the configured level nothing is written."""
    configure_logging(level="WARNING", stream=out)
    log = get_logger()
    log.debug("no")
    log.info("no")
    log.warning("yes")
    assert [e["event"] for e in lines(out)] == ["yes"]


def test_unknown_level_rejected(out: io.BytesIO) -> None:
    """An unknown level name is a ValueError."""
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="chatty", stream=out)


def test_reconfigure_switches_stream_and_level(out: io.BytesIO) -> None:
    """Calling configure again (reload) replaces level and stream for existing loggers."""
    log = get_logger()
    configure_logging(level="info", stream=out)
    log.info("to first")
    second = io.BytesIO()
    configure_logging(level="error", stream=second)
    log.info("dropped")
    log.error("to second")
    assert [e["event"] for e in lines(out)] == ["to first"]
    assert [e["event"] for e in lines(second)] == ["to second"]


def test_exception_rendered_as_string_field(out: io.BytesIO) -> None:
    """log.exception puts the formatted traceback in one string field."""
    configure_logging(stream=out)
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        get_logger().exception("failed")
    (event,) = lines(out)
    assert event["level"] == "error"
    assert isinstance(event["exception"], str)
    assert "Traceback" in event["exception"]
    assert "RuntimeError: kaput" in event["exception"]


def test_unencodable_values_do_not_break_logging(out: io.BytesIO) -> None:
    """An int past 64 bits or a lone surrogate still yields one valid JSON line."""
    configure_logging(stream=out)
    get_logger().info("odd", big=2**70, text="\ud800", fine=1)
    (event,) = lines(out)
    assert event["event"] == "odd"
    assert event["big"] == str(2**70)
    assert event["fine"] == 1
    assert "log_error" in event


# --- run context -------------------------------------------------------------------------


def test_bind_run_adds_then_removes_context(out: io.BytesIO) -> None:
    """agent and run_id appear on every line inside bind_run and disappear after it."""
    configure_logging(stream=out)
    log = get_logger()
    log.info("before")
    with bind_run("digest", "r-1"):
        log.info("inside")
        get_logger(other=True).info("inside too")
    log.info("after")
    before, inside, inside_too, after = lines(out)
    assert "agent" not in before
    assert (inside["agent"], inside["run_id"]) == ("digest", "r-1")
    assert (inside_too["agent"], inside_too["run_id"]) == ("digest", "r-1")
    assert "agent" not in after
    assert "run_id" not in after


def test_bind_run_nested_restores_outer(out: io.BytesIO) -> None:
    """Leaving an inner bind_run restores the outer run's context."""
    configure_logging(stream=out)
    log = get_logger()
    with bind_run("outer", "r-1"):
        with bind_run("inner", "r-2"):
            log.info("inner")
        log.info("outer")
    inner, outer = lines(out)
    assert (inner["agent"], inner["run_id"]) == ("inner", "r-2")
    assert (outer["agent"], outer["run_id"]) == ("outer", "r-1")


async def test_bind_run_is_per_task(out: io.BytesIO) -> None:
    """Concurrent runs in separate tasks each log their own agent and run_id."""
    configure_logging(stream=out)
    log = get_logger()

    async def run(agent: str, run_id: str) -> None:
        with bind_run(agent, run_id):
            await asyncio.sleep(0)
            log.info("step")

    await asyncio.gather(run("a", "1"), run("b", "2"))
    assert sorted((e["agent"], e["run_id"]) for e in lines(out)) == [("a", "1"), ("b", "2")]


# --- redaction ---------------------------------------------------------------------------


def test_sensitive_keys_redacted_at_any_depth(out: io.BytesIO) -> None:
    """Values under sensitive keys are redacted in nested dicts and lists, case-insensitively."""
    configure_logging(stream=out)
    headers = {"Authorization": "Basic abc", "X-Api-Key": "k1", "Accept": "json"}
    body = {"items": [{"password": "p1", "prompt_tokens": 12}], "meta": {"Set-Cookie": "c"}}
    get_logger().info("call", headers=headers, body=body, api_key="top", tokens=40)
    (event,) = lines(out)
    assert event["api_key"] == REDACTED
    assert event["headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED, "Accept": "json"}
    assert event["body"]["items"] == [{"password": REDACTED, "prompt_tokens": 12}]
    assert event["body"]["meta"] == {"Set-Cookie": REDACTED}
    # Token counts are not credentials.
    assert event["tokens"] == 40
    # The caller's objects are not changed.
    assert headers["Authorization"] == "Basic abc"
    assert body["items"] == [{"password": "p1", "prompt_tokens": 12}]


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "APIKEY",
        "token",
        "Access_Token",
        "refresh_token",
        "secret",
        "client_secret",
        "authorization",
        "password",
        "passwd",
        "Cookie",
        "set-cookie",
        "x-api-key",
    ],
)
def test_every_sensitive_key_name(key: str) -> None:
    """Each listed key name is redacted whatever its case."""
    redactor = Redactor()
    event = redactor(None, "info", {"event": "e", key: "value", "nested": {key: "v"}})
    assert event[key] == REDACTED
    assert event["nested"] == {key: REDACTED}


def test_secret_values_redacted_in_message_and_exception(out: io.BytesIO) -> None:
    """A registered secret is removed from the message, any string value and the traceback."""
    configure_logging(stream=out, secrets=[SECRET])
    log = get_logger()
    log.info(f"using key {SECRET} now", url=f"https://x/?k={SECRET}", items=[f"a{SECRET}b"])
    try:
        raise RuntimeError(f"rejected key {SECRET}")
    except RuntimeError:
        log.exception("call failed")
    assert SECRET.encode() not in out.getvalue()
    message, failure = lines(out)
    assert message["event"] == f"using key {REDACTED} now"
    assert message["url"] == f"https://x/?k={REDACTED}"
    assert message["items"] == [f"a{REDACTED}b"]
    assert f"RuntimeError: rejected key {REDACTED}" in failure["exception"]


def test_secret_values_redacted_in_non_json_objects(out: io.BytesIO) -> None:
    """Exceptions, bytes and dataclasses passed as values are redacted too."""
    configure_logging(stream=out, secrets=[SECRET])
    get_logger().info(
        "odd values",
        error=ValueError(f"bad {SECRET}"),
        raw=SECRET.encode(),
        creds=_Creds(user=SECRET, password="pw"),
    )
    assert SECRET.encode() not in out.getvalue()
    (event,) = lines(out)
    assert event["error"] == f"ValueError('bad {REDACTED}')"
    assert event["creds"] == {"user": REDACTED, "password": REDACTED}


def test_secrets_added_on_reconfigure(out: io.BytesIO) -> None:
    """Calling configure again with new secrets redacts those from then on."""
    configure_logging(stream=out)
    new_secret = "rotated-secret-0042"
    get_logger().info(new_secret)
    configure_logging(stream=out, secrets=[new_secret])
    get_logger().info(new_secret)
    assert [e["event"] for e in lines(out)] == [new_secret, REDACTED]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "Authorization: Bearer eyJhbGc.iOi-J_9~+/x==",
            f"Authorization: Bearer {REDACTED}",
            id="bearer",
        ),
        pytest.param(
            "header bearer abc123 sent", f"header bearer {REDACTED} sent", id="bearer-lowercase"
        ),
        pytest.param("key=sk-proj-Abcdefghijklmnop1234", f"key={REDACTED}", id="openai-key"),
        pytest.param(
            "sk-ant-api03-abcdefghijklmnopqrstu used", f"{REDACTED} used", id="anthropic-key"
        ),
        pytest.param(
            "task-abcdefghijklmnopqrstuvwx",
            "task-abcdefghijklmnopqrstuvwx",
            id="not-a-key-inside-word",
        ),
        pytest.param("we use sk-learn here", "we use sk-learn here", id="short-sk-untouched"),
        pytest.param("nothing to see", "nothing to see", id="plain"),
    ],
)
def test_token_patterns_in_strings(text: str, expected: str) -> None:
    """Bearer tokens and sk- keys are redacted with no secret registered."""
    assert Redactor().redact_text(text) == expected


def test_short_secrets_ignored() -> None:
    """Secrets shorter than 6 characters are not registered: they would shred normal text."""
    redactor = Redactor(["abc", "", "12345"])
    assert redactor.secret_count == 0
    assert redactor.redact_text("abc 12345") == "abc 12345"


def test_longer_secret_wins_over_contained_one() -> None:
    """When one secret contains another, the whole longer one is redacted."""
    redactor = Redactor(["secret", "secret-and-more"])
    assert redactor.redact_text("x secret-and-more y") == f"x {REDACTED} y"


def test_secret_with_regex_characters_is_literal() -> None:
    """Secrets are matched literally, not as patterns."""
    redactor = Redactor(["a.b*c+d?"])
    assert redactor.redact_text("a.b*c+d? axbbbcd") == f"{REDACTED} axbbbcd"


def test_deep_and_cyclic_structures_are_bounded() -> None:
    """Very deep or self-referencing values are cut off instead of recursing forever."""
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    event = Redactor()(None, "info", {"event": "e", "cyclic": cyclic})
    depth = 0
    node = event["cyclic"]
    while isinstance(node, dict):
        node = node["self"]
        depth += 1
    assert node == "[TRUNCATED]"
    assert depth < 100


# --- stdlib routing ----------------------------------------------------------------------


def test_stdlib_logging_routed_as_json(out: io.BytesIO) -> None:
    """stdlib records at WARNING+ are JSON lines on the same stream with run context."""
    configure_logging(level="debug", stream=out, secrets=[SECRET])
    get_logger().info("from structlog")
    std = logging.getLogger("apscheduler.scheduler")
    with bind_run("digest", "r-9"):
        std.info("below warning: dropped")
        std.warning("job %s missed its fire time by %ss", "digest", 3)
        try:
            raise OSError(f"cannot reach {SECRET}")
        except OSError:
            std.exception("job crashed")
    assert SECRET.encode() not in out.getvalue()
    ours, missed, crashed = lines(out)
    assert ours["event"] == "from structlog"
    assert missed["event"] == "job digest missed its fire time by 3s"
    assert missed["level"] == "warning"
    assert missed["logger"] == "apscheduler.scheduler"
    assert (missed["agent"], missed["run_id"]) == ("digest", "r-9")
    assert missed["ts"].endswith("Z")
    assert crashed["level"] == "error"
    assert f"OSError: cannot reach {REDACTED}" in crashed["exception"]


def test_stdlib_handler_not_duplicated_on_reconfigure(out: io.BytesIO) -> None:
    """Configuring twice leaves one handler: each stdlib record is written once."""
    configure_logging(stream=out)
    configure_logging(stream=out)
    logging.getLogger("uvicorn.error").warning("once")
    assert [e["event"] for e in lines(out)] == ["once"]


def test_default_stream_is_stdout(
    out: io.BytesIO, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """With no stream given, lines go to stdout."""
    configure_logging()
    get_logger().warning("to stdout")
    captured = capsysbinary.readouterr().out
    assert orjson.loads(captured.splitlines()[-1])["event"] == "to stdout"
