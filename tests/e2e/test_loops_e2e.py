"""Loop and stall detection in the real daemon: runaway agents stop early, with evidence."""

from __future__ import annotations

import socket

import pytest

from supervisor.llm.fakeserver import FakeLLMServer
from tests.e2e.conftest import fleet_config

pytestmark = pytest.mark.e2e


def test_repeated_model_call_is_stopped_after_the_configured_repeats(daemon_factory) -> None:
    """The same model call forever: loop_detected after 3 requests, long before max_steps."""
    with FakeLLMServer() as srv:
        d = daemon_factory(
            fleet_config(
                f"""
llm:
  providers:
    local: {{kind: openai, base_url: "{srv.openai_base_url}"}}
  models:
    local/m: {{price: {{input: 1, output: 1}}}}
  aliases:
    local: [local/m]
agents:
  - name: asker
    run: "loop_agents:ask_forever"
    schedule: every 3s
    guards: {{max_steps: 1000, repeat: {{mode: enforce, max_repeats: 3}}}}
""",
            )
        ).ready()
        run = d.event("run.finished", timeout=20, agent="asker")[0]
        assert run["outcome"] == "loop_detected"
        assert run["loop"]["detector"] == "repeat"
        assert run["loop"]["evidence"]["count"] == 4
        assert run["steps"] == 3
        assert srv.count() == 3  # the fourth identical call never reached the provider
        assert (
            d.sample(
                "agent_supervisor_loop_detections_total",
                agent="asker",
                detector="repeat",
                action="stopped",
            )
            == 1
        )


def test_empty_steps_end_as_no_progress(daemon_factory) -> None:
    """Steps that change nothing: loop_detected by the no_progress detector, not max_steps."""
    d = daemon_factory(
        fleet_config(
            """
agents:
  - name: spinner
    run: "loop_agents:empty_steps"
    schedule: every 0.5s
    guards: {max_steps: 10000, no_progress: {mode: enforce, max_idle_steps: 10}}
"""
        )
    ).ready()
    run = d.event("run.finished", timeout=15, agent="spinner")[0]
    assert run["outcome"] == "loop_detected"
    assert run["loop"]["detector"] == "no_progress"
    assert run["steps"] <= 11


def test_waiting_on_a_dead_socket_ends_stalled_long_before_the_timeout(daemon_factory) -> None:
    """No step and no call for 1 s: stalled, although the timeout is 60 s away."""
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen()
    try:
        port = peer.getsockname()[1]
        d = daemon_factory(
            fleet_config(
                f"""
agents:
  - name: waiter
    run: "loop_agents:dead_socket"
    schedule: every 0.5s
    guards: {{timeout: 60s, stall: {{mode: enforce, max_silence: 1s}}}}
    params: {{port: {port}}}
"""
            )
        ).ready()
        run = d.event("run.finished", timeout=20, agent="waiter")[0]
        assert run["outcome"] == "stalled"
        assert run["loop"]["detector"] == "stall"
        assert 1.0 <= run["duration_s"] < 5.0
    finally:
        peer.close()
