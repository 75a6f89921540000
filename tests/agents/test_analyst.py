"""The analyst: the model's analysis, the rule-based tier, the raw tier, each source, and
malformed data that fails the run clearly with nothing written."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agents.analyst import AnalystParams, analyst
from supervisor.llm.fakeserver import FakeLLMServer, Fault
from supervisor.outcome import Outcome
from tests.agents.conftest import Harness, Web, closed_port

NAME = "analyst"
CSV = "region,orders,revenue\nnorth,10,100.5\nsouth,20,300\neast,30,200\n"
ANALYSIS = {
    "headline": "South leads on revenue",
    "findings": ["South earns the most per order.", "East has the most orders."],
    "caveats": ["Three rows only."],
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "sales.csv"
    write(path, CSV)
    return path


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    return tmp_path / "reports"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def params(reports: Path, **source: Any) -> AnalystParams:
    return AnalystParams(name="sales", report_dir=reports, **source)


def nothing_written(reports: Path) -> bool:
    return not reports.exists()


def report(reports: Path) -> str:
    (path,) = reports.glob("*.md")
    return path.read_text()


async def test_the_model_analyses_the_data_into_the_schema(
    harness: Harness, fake_llm: FakeLLMServer, data: Path, reports: Path
) -> None:
    """Tier 0: the model's JSON becomes the report, with the numbers table under it."""
    await harness.use_llm(fake_llm.openai_base_url)
    fake_llm.reply("m1", json.dumps(ANALYSIS))
    record, state = await harness.run(analyst, params(reports, file=data), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["tier"] == "0"
    text = report(reports)
    assert "Analysis by fake/m1." in text and "**South leads on revenue**" in text
    assert "| revenue | 3 | 100.5 | 300 | 200.2 | new |" in text
    assert (reports / "sales-2026-03-02.md").exists()
    assert state.data["reported"] == "sales:2026-03-02"
    assert state.data["means"]["orders"] == 20.0
    prompt = fake_llm.requests[0].body["messages"][1]["content"]
    assert "<<<UNTRUSTED source=data" in prompt and '"region": "north"' in prompt
    assert harness.answers(NAME, "0") == 1


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault.status(500), id="http-500"),
        pytest.param(Fault.malformed(), id="malformed"),
        pytest.param(
            Fault.malformed('{"choices": [{"message": {"content": "not json"}}]}'),
            id="not-the-schema",
        ),
    ],
)
async def test_when_the_model_fails_the_rule_based_summary_answers(
    harness: Harness, fake_llm: FakeLLMServer, data: Path, reports: Path, fault: Fault
) -> None:
    """Tier rule_based: counts, min/max/mean per numeric column; counted in the metrics."""
    await harness.use_llm(fake_llm.openai_base_url)
    fake_llm.enqueue(fault, fault, fault, fault)
    record, _ = await harness.run(analyst, params(reports, file=data), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["tier"] == "rule_based"
    text = report(reports)
    assert "Analysis by a rule-based summary." in text
    assert "- orders: mean 20 (new since the previous report), min 10, max 30" in text
    assert harness.answers(NAME, "rule_based") == 1


async def test_an_unreachable_model_degrades_to_the_rule_based_summary(
    harness: Harness, data: Path, reports: Path
) -> None:
    """No server at all (the example fleet offline): the ladder hops, rules answer."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    record, _ = await harness.run(analyst, params(reports, file=data), name=NAME)
    assert record.result["tier"] == "rule_based"
    assert "every model of 'smart' failed" in report(reports)


async def test_the_rule_based_summary_shows_the_change_since_the_previous_report(
    harness: Harness, data: Path, reports: Path
) -> None:
    """Means are kept in state: the next period's report says how each one moved."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    await harness.run(analyst, params(reports, file=data), name=NAME)
    write(data, CSV.replace("north,10", "north,40"))
    harness.clock.advance(timedelta(days=1))
    await harness.run(analyst, params(reports, file=data), name=NAME)
    text = (reports / "sales-2026-03-03.md").read_text()
    assert "- orders: mean 30 (+50.0% since the previous report)" in text
    assert "| orders | 3 | 20 | 40 | 30 | +50.0% |" in text


async def test_without_numbers_the_raw_rows_come_with_a_note(
    harness: Harness, tmp_path: Path, reports: Path
) -> None:
    """Tier raw: nothing numeric to summarise and no model: the rows as they are."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    path = tmp_path / "names.json"
    write(path, json.dumps([{"name": "ada"}, {"name": "grace"}]))
    record, _ = await harness.run(analyst, params(reports, file=path), name=NAME)
    assert record.result["tier"] == "raw"
    text = report(reports)
    assert "Analysis by the raw data." in text and '"name": "grace"' in text
    assert "raw data returned" in text
    assert harness.answers(NAME, "raw") == 1


async def test_one_report_per_period(
    harness: Harness, data: Path, reports: Path, fake_llm: FakeLLMServer
) -> None:
    """A second run in the same period asks no model and writes nothing."""
    await harness.use_llm(fake_llm.openai_base_url)
    fake_llm.reply("m1", json.dumps(ANALYSIS))
    await harness.run(analyst, params(reports, file=data), name=NAME)
    harness.clock.advance(timedelta(hours=2))
    record, _ = await harness.run(analyst, params(reports, file=data), name=NAME)
    assert record.result == {
        "report": "sales:2026-03-02",
        "skipped": "already reported for this period",
    }
    assert fake_llm.count() == 1
    assert harness.effects.stats["executed"] == 1


@pytest.mark.parametrize(
    ("file", "content", "error"),
    [
        pytest.param(
            "bad.csv",
            "a,b,c\n1,2,3\n4,5\n",
            "bad.csv:3: 2 fields, the header has 3",
            id="csv-fields",
        ),
        pytest.param("bad.csv", 'a,b\n1,"unclosed\n', "bad.csv:", id="csv-quote"),
        pytest.param("bad.csv", "", "bad.csv:1: no header row", id="csv-empty"),
        pytest.param(
            "bad.json", '[{"a": 1},\n {"a": 2,}\n]', "bad.json:2:10: invalid JSON", id="json-syntax"
        ),
        pytest.param(
            "bad.json", '{"a": 1}', "bad.json: expected a list of objects", id="json-shape"
        ),
        pytest.param(
            "bad.json", "[1, 2]", "bad.json: expected a list of objects", id="json-scalars"
        ),
    ],
)
async def test_malformed_data_fails_the_run_naming_the_line_and_writes_nothing(
    harness: Harness, tmp_path: Path, reports: Path, file: str, content: str, error: str
) -> None:
    """A clear error in the run record (file and line), never retried, no report."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    path = tmp_path / file
    write(path, content)
    record, state = await harness.run(
        analyst, params(reports, file=path), name=NAME, retry_attempts=3
    )
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "DataError" and error in (record.error or "")
    assert record.attempts == 1
    assert nothing_written(reports)
    assert await harness.ledger.list() == []
    assert "reported" not in state.data


async def test_a_missing_file_is_a_clear_error(
    harness: Harness, tmp_path: Path, reports: Path
) -> None:
    """The path and the reason, not a traceback."""
    record, _ = await harness.run(analyst, params(reports, file=tmp_path / "nope.csv"), name=NAME)
    assert (
        record.error
        == f"DataError: {tmp_path / 'nope.csv'}: cannot read: No such file or directory"
    )


async def test_reads_an_http_json_endpoint(harness: Harness, web: Web, reports: Path) -> None:
    """The rows may sit under a key of the endpoint's JSON object."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    web.route("GET", "/api/sales", body=json.dumps({"rows": [{"n": 1}, {"n": 3}]}))
    p = params(reports, url=f"{web.url}/api/sales", records_key="rows")
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    record, _ = await harness.run(analyst, p, name=NAME, agent_config=config)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert "| n | 2 | 1 | 3 | 2 | new |" in report(reports)


async def test_an_unreachable_endpoint_fails_the_run_as_transient(
    harness: Harness, reports: Path
) -> None:
    """Connection refused: a TransientError (the run-level retry applies), nothing written."""
    url = f"http://127.0.0.1:{closed_port()}/api/sales"
    config = {"http": {"allow_hosts": ["127.0.0.1"], "retries": 0}}
    record, _ = await harness.run(
        analyst, params(reports, url=url), name=NAME, agent_config=config, retry_attempts=2
    )
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "TransientError" and f"GET {url}: ConnectError" in (
        record.error or ""
    )
    assert record.attempts == 2
    assert nothing_written(reports)


async def test_reads_a_prometheus_query(harness: Harness, web: Web, reports: Path) -> None:
    """Each series of an instant vector is a row: its labels and its value."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    vector = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"job": "api"}, "value": [1700000000, "0.25"]},
                {"metric": {"job": "web"}, "value": [1700000000, "0.75"]},
            ],
        },
    }
    web.route("GET", "/api/v1/query", body=json.dumps(vector))
    p = params(reports, prometheus={"url": web.url, "query": "rate(errors[5m])"})
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    record, _ = await harness.run(analyst, p, name=NAME, agent_config=config)
    assert record.outcome is Outcome.SUCCESS, record.error
    (request,) = web.received("GET", "/api/v1/query")
    assert request.query == {"query": ["rate(errors[5m])"]}
    assert "| value | 2 | 0.25 | 0.75 | 0.5 | new |" in report(reports)


async def test_posts_the_report_to_a_webhook_once(harness: Harness, web: Web, data: Path) -> None:
    """The webhook gets a Slack-compatible body, once per period."""
    await harness.use_llm(f"http://127.0.0.1:{closed_port()}/v1")
    web.route("POST", "/hook", body="ok")
    p = AnalystParams(name="sales", file=data, webhook_url=f"{web.url}/hook")
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    record, _ = await harness.run(analyst, p, name=NAME, agent_config=config)
    assert record.outcome is Outcome.SUCCESS, record.error
    (request,) = web.received("POST", "/hook")
    assert json.loads(request.body)["text"].startswith("# sales: 2026-03-02")
    await harness.run(analyst, p, name=NAME, agent_config=config)
    assert len(web.received("POST", "/hook")) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"report_dir": "r"}, "exactly one source", id="no-source"),
        pytest.param(
            {"report_dir": "r", "file": "a.csv", "url": "http://x"},
            "exactly one source",
            id="two-sources",
        ),
        pytest.param({"file": "a.csv"}, "report_dir, webhook_url or both", id="no-output"),
    ],
)
def test_params_are_checked(fields: dict[str, Any], message: str) -> None:
    """Sources and outputs are validated with the config, not at run time."""
    with pytest.raises(ValidationError, match=message):
        AnalystParams.model_validate(fields)
