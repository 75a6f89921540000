"""The publisher: exactly once per post id, the gatekeeper, the daily limit, approval, bad
files kept in the queue, and the crash between the effect and the move."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agents.publisher import PublisherParams, publisher
from supervisor.effects import EffectStatus
from supervisor.outcome import Outcome
from tests.agents.conftest import Harness, Web, closed_port

NAME = "publisher"
LIMIT = {"effects": {"allow": ["post"], "kinds": {"post": {"rate": "2/day"}}}}


def post(
    queue: Path, file: str, pid: str, body: str, *, title: str = "A title", risk: str = "normal"
) -> Path:
    path = queue / file
    path.write_text(f"---\nid: {pid}\ntitle: {title}\nrisk: {risk}\n---\n{body}\n")
    return path


def texts(n: int) -> list[str]:
    """``n`` bodies that are not near-duplicates of each other."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return [
        f"Post {i} about {words[i]} and {words[i + 1]}: news number {i} of the week."
        for i in range(n)
    ]


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    q = tmp_path / "queue"
    q.mkdir()
    return q


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return tmp_path / "site"


def params(queue: Path, site: Path, **extra: Any) -> PublisherParams:
    return PublisherParams(queue=queue, target_dir=site, **extra)


def published_ids(site: Path) -> list[str]:
    return sorted(p.stem for p in site.glob("*.md"))


def queued(queue: Path) -> list[str]:
    return sorted(p.name for p in queue.glob("*.md"))


async def test_publishes_the_queue_to_the_folder_target_and_moves_the_files(
    harness: Harness, queue: Path, site: Path
) -> None:
    """Each post is written to the target once and its file moved to published/ after."""
    for i, body in enumerate(texts(2)):
        post(queue, f"0{i}.md", f"post-{i}", body)
    record, state = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["published"] == ["post-0", "post-1"]
    assert published_ids(site) == ["post-0", "post-1"]
    assert sorted(p.name for p in (queue / "published").iterdir()) == ["00.md", "01.md"]
    assert queued(queue) == []
    written = (site / "post-0.md").read_text()
    assert "idempotency_key:" in written and texts(1)[0] in written
    assert set(state.data["published"]) == {"post-0", "post-1"}
    assert harness.effects.stats["executed"] == 2


async def test_the_daily_limit_defers_the_rest_of_the_queue(
    harness: Harness, queue: Path, site: Path
) -> None:
    """With post: 2/day, two posts go out; the third waits, queued, for the next day."""
    for i, body in enumerate(texts(3)):
        post(queue, f"0{i}.md", f"post-{i}", body)
    record, _ = await harness.run(publisher, params(queue, site), name=NAME, agent_config=LIMIT)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["published"] == ["post-0", "post-1"]
    assert record.result["deferred"] == 1
    assert queued(queue) == ["02.md"]

    harness.clock.advance(timedelta(hours=1))
    record, _ = await harness.run(publisher, params(queue, site), name=NAME, agent_config=LIMIT)
    assert record.result["published"] == [] and record.result["deferred"] == 1
    assert published_ids(site) == ["post-0", "post-1"]

    harness.clock.advance(timedelta(days=1))
    record, _ = await harness.run(publisher, params(queue, site), name=NAME, agent_config=LIMIT)
    assert record.result["published"] == ["post-2"]
    assert published_ids(site) == ["post-0", "post-1", "post-2"]


async def test_a_crash_between_the_effect_and_the_move_never_publishes_twice(
    harness: Harness, queue: Path, site: Path
) -> None:
    """The post is written, the move fails and the state is lost; after a restart the
    ledger hands back the recorded result: the file is moved, nothing is written again."""
    post(queue, "01.md", "launch", texts(1)[0])
    (queue / "published").write_text("not a folder: the move after the effect fails")
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.outcome is Outcome.FAILURE
    assert "published" in (record.error or "")
    assert published_ids(site) == ["launch"]
    first = (site / "launch.md").read_text()
    assert (queue / "01.md").exists()  # still queued: nothing is lost

    (queue / "published").unlink()
    await harness.restart(lose_state=NAME)
    record, state = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["published"] == ["launch"]
    assert harness.effects.stats["duplicate_prevented"] == 1
    assert harness.effects.stats["executed"] == 0
    assert (site / "launch.md").read_text() == first
    assert (queue / "published" / "01.md").exists()
    assert "launch" in state.data["published"]


async def test_a_post_is_published_once_even_if_queued_again(
    harness: Harness, queue: Path, site: Path
) -> None:
    """A published file put back into the queue is not published again."""
    path = post(queue, "01.md", "launch", texts(1)[0])
    text = path.read_text()
    await harness.run(publisher, params(queue, site), name=NAME)
    (queue / "01.md").write_text(text)
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.result["published"] == ["launch"]  # moved aside again...
    assert harness.effects.stats["executed"] == 1  # ...but written once
    assert harness.effects.stats["duplicate_prevented"] == 1


async def test_an_id_reused_for_another_text_is_rejected(
    harness: Harness, queue: Path, site: Path
) -> None:
    """A second file with a published id but a different text is not passed off as done."""
    one, two = texts(2)
    post(queue, "01.md", "launch", one)
    await harness.run(publisher, params(queue, site), name=NAME)
    post(queue, "02.md", "launch", two)
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert "already published with another text" in record.result["rejected"]["launch"]
    assert (queue / "rejected" / "02.md").exists()
    assert one in (site / "launch.md").read_text()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param("Just a body, no front matter.\n", "01-bad.md:1: no front matter", id="none"),
        pytest.param(
            "---\nid: x\ntitle: [unclosed\n---\nbody\n",
            "01-bad.md:3: front matter is not valid YAML",
            id="yaml",
        ),
        pytest.param(
            "---\nid: x\n---\nbody\n", "front matter: title: Field required", id="no-title"
        ),
        pytest.param(
            "---\nid: no spaces allowed\ntitle: t\n---\nbody\n",
            "front matter: id: String should match",
            id="bad-id",
        ),
        pytest.param(
            "---\nid: x\ntitle: t\nrisk: extreme\n---\nbody\n",
            "front matter: risk: Input should be",
            id="bad-risk",
        ),
        pytest.param(
            "---\nid: x\ntitle: t\ncolour: red\n---\nbody\n",
            "front matter: colour: Extra inputs",
            id="unknown-key",
        ),
        pytest.param(
            "---\n- a list\n---\nbody\n", "01-bad.md:2: front matter must be", id="not-a-mapping"
        ),
    ],
)
async def test_invalid_front_matter_is_skipped_and_stays_queued(
    harness: Harness, queue: Path, site: Path, content: str, problem: str
) -> None:
    """A bad file is skipped with an error naming the file and the problem; the others go
    out, and the bad one stays in the queue for a human to fix."""
    (queue / "01-bad.md").write_text(content)
    post(queue, "02-good.md", "good", texts(1)[0])
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["skipped"] == 1
    (error,) = record.result["errors"]
    assert problem in error and str(queue / "01-bad.md") in error
    assert record.result["published"] == ["good"]
    assert (queue / "01-bad.md").read_text() == content


async def test_a_file_that_is_not_utf8_is_skipped(
    harness: Harness, queue: Path, site: Path
) -> None:
    """Undecodable bytes are an invalid post like any other, not a crash."""
    (queue / "01.md").write_bytes(b"---\nid: x\ntitle: \xff\xfe\n---\nbody\n")
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.result["skipped"] == 1 and "not UTF-8" in record.result["errors"][0]


@pytest.mark.parametrize(
    ("body", "options", "reason"),
    [
        pytest.param(
            "x" * 200, {"max_chars": 100}, "200 characters, over max_chars 100", id="too-long"
        ),
        pytest.param(
            "Guaranteed RESULTS in a week.",
            {"banned_phrases": ["guaranteed results"]},
            "banned phrase 'guaranteed results'",
            id="banned",
        ),
        pytest.param("   ", {}, "the body is empty", id="empty"),
    ],
)
async def test_the_gatekeeper_rejects_a_post(
    harness: Harness, queue: Path, site: Path, body: str, options: dict[str, Any], reason: str
) -> None:
    """A refused post is moved to rejected/ with the reason; nothing reaches the target."""
    post(queue, "01.md", "refused", body)
    record, _ = await harness.run(publisher, params(queue, site, **options), name=NAME)
    assert reason in record.result["rejected"]["refused"]
    assert (queue / "rejected" / "01.md").exists()
    assert published_ids(site) == []
    assert harness.effects.stats["refused:invalid_params"] == 1


async def test_a_near_duplicate_of_a_published_post_is_rejected(
    harness: Harness, queue: Path, site: Path
) -> None:
    """The gatekeeper compares word sets with every post published before, in any run."""
    body = texts(1)[0]
    post(queue, "01.md", "first", body)
    await harness.run(publisher, params(queue, site), name=NAME)
    harness.clock.advance(timedelta(days=3))
    post(queue, "02.md", "second", body.replace("week.", "week!"))
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert "nearly repeats published post 'first'" in record.result["rejected"]["second"]
    assert published_ids(site) == ["first"]


async def test_a_high_risk_post_waits_for_approval(
    harness: Harness, queue: Path, site: Path
) -> None:
    """risk: high ends the run awaiting approval (the others still go out); once approved,
    the next run publishes it."""
    one, two = texts(2)
    post(queue, "01.md", "pricing", one, risk="high")
    post(queue, "02.md", "normal", two)
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.outcome is Outcome.AWAITING_APPROVAL
    assert record.partial["waiting_approval"] == ["pricing"]
    assert record.partial["published"] == ["normal"]
    assert (queue / "01.md").exists()
    (request,) = await harness.effects.pending()
    assert request.reason == "01.md is marked risk: high"
    assert request.params["body"] == one + "\n"

    await harness.effects.approve(request.id, "reviewer")
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert record.outcome is Outcome.SUCCESS, record.error
    assert record.result["published"] == ["pricing"]
    assert published_ids(site) == ["normal", "pricing"]


async def test_a_rejected_high_risk_post_is_moved_aside(
    harness: Harness, queue: Path, site: Path
) -> None:
    """A post a human rejected never goes out; its file goes to rejected/."""
    post(queue, "01.md", "pricing", texts(1)[0], risk="high")
    await harness.run(publisher, params(queue, site), name=NAME)
    (request,) = await harness.effects.pending()
    await harness.effects.reject(request.id, "reviewer", "not this month")
    record, _ = await harness.run(publisher, params(queue, site), name=NAME)
    assert "not this month" in record.result["rejected"]["pricing"]
    assert (queue / "rejected" / "01.md").exists()
    assert published_ids(site) == []


async def test_the_http_target_gets_json_with_an_idempotency_key(
    harness: Harness, queue: Path, web: Web
) -> None:
    """The HTTP target receives one POST per post, with the ledger's Idempotency-Key."""
    web.route("POST", "/posts", 201, '{"ok": true}', content_type="application/json")
    post(queue, "01.md", "launch", texts(1)[0], title="Launch")
    p = PublisherParams(queue=queue, target_url=f"{web.url}/posts")
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    record, _ = await harness.run(publisher, p, name=NAME, agent_config=config)
    assert record.outcome is Outcome.SUCCESS, record.error
    (request,) = web.received("POST", "/posts")
    assert request.headers["idempotency-key"]
    assert b'"title":"Launch"' in request.body.replace(b" ", b"")
    record, _ = await harness.run(publisher, p, name=NAME, agent_config=config)
    assert len(web.received("POST", "/posts")) == 1


async def test_an_unreachable_http_target_publishes_nothing_and_loses_nothing(
    harness: Harness, queue: Path, web: Web
) -> None:
    """Connection refused: the effect did not start, the run fails and may retry, the post
    stays queued; once the target is up, it is published exactly once."""
    post(queue, "01.md", "launch", texts(1)[0])
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    down = PublisherParams(queue=queue, target_url=f"http://127.0.0.1:{closed_port()}/posts")
    record, _ = await harness.run(publisher, down, name=NAME, agent_config=config)
    assert record.outcome is Outcome.FAILURE
    assert record.error_type == "EffectNotStarted" and "nothing sent" in (record.error or "")
    assert (queue / "01.md").exists()
    (rec,) = await harness.ledger.list()
    assert rec.status is EffectStatus.FAILED

    web.route("POST", "/posts", 200, "{}")
    up = PublisherParams(queue=queue, target_url=f"{web.url}/posts")
    record, _ = await harness.run(publisher, up, name=NAME, agent_config=config)
    assert record.result["published"] == ["launch"]
    assert len(web.received("POST", "/posts")) == 1


async def test_a_5xx_from_the_target_is_held_for_a_human_not_repeated(
    harness: Harness, queue: Path, web: Web
) -> None:
    """A 5xx may mean it was published: the outcome is unknown, the next run holds the
    post (it stays queued) and never posts it again by itself."""
    web.route("POST", "/posts", 503, "busy")
    post(queue, "01.md", "launch", texts(1)[0])
    p = PublisherParams(queue=queue, target_url=f"{web.url}/posts")
    config = {"http": {"allow_hosts": ["127.0.0.1"]}}
    record, _ = await harness.run(publisher, p, name=NAME, agent_config=config)
    assert record.outcome is Outcome.FAILURE
    record, _ = await harness.run(publisher, p, name=NAME, agent_config=config)
    assert record.result["held"] == ["launch"]
    assert (queue / "01.md").exists()
    assert len(web.received("POST", "/posts")) == 1


async def test_seed_from_copies_samples_once(
    harness: Harness, queue: Path, site: Path, tmp_path: Path
) -> None:
    """seed_from fills the queue with posts it has never seen, and never again after."""
    samples = tmp_path / "samples"
    samples.mkdir()
    post(samples, "01.md", "sample", texts(1)[0])
    p = params(queue, site, seed_from=samples)
    record, _ = await harness.run(publisher, p, name=NAME)
    assert record.result["published"] == ["sample"]
    record, _ = await harness.run(publisher, p, name=NAME)
    assert record.result["published"] == [] and queued(queue) == []


def test_params_need_exactly_one_target(tmp_path: Path) -> None:
    """A publisher with no target, or two, is a config error."""
    with pytest.raises(ValidationError, match="exactly one of target_dir or target_url"):
        PublisherParams(queue=tmp_path)
    with pytest.raises(ValidationError, match="exactly one of target_dir or target_url"):
        PublisherParams(queue=tmp_path, target_dir=tmp_path, target_url="http://x")
