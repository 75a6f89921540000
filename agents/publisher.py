"""publisher: publish queued Markdown posts to a target, each exactly once, within a daily limit.

A post is a Markdown file in the queue folder with YAML front matter::

    ---
    id: launch-day      # the post's identity: it is published at most once, ever
    title: We launched
    risk: normal        # or high: a human approves it first
    ---
    The body, in Markdown.

Each run takes the queue in file-name order: an invalid file is skipped with a clear error and
stays queued; ``ctx.effect("post", id, ...)`` publishes the others exactly once per id, after
the gatekeeper (``validate=``: length, banned phrases, near-duplicates), approval for
``risk: high`` and the kind's rate limit (``effects.kinds.post.rate: 2/day``, which defers the
rest of the queue). Only then does the file move to ``published/`` (refused ones to
``rejected/``): after a crash in between, the next run gets the recorded result back without
publishing again, and moves the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from supervisor import (
    ApprovalPending,
    CallRefused,
    EffectHeld,
    EffectNotStarted,
    EffectRefused,
    EffectRejected,
    RunContext,
)

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)(.*)\Z", re.S)


class PublisherParams(BaseModel):
    """Params of the publisher agent."""

    #: folder of queued posts (``*.md``); ``published/`` and ``rejected/`` are made inside it
    queue: Path
    #: local folder target: each post is written there as ``<id>.md``
    target_dir: Path | None = None
    #: HTTP API target: each post is POSTed there as JSON ``{id, title, body}``
    target_url: str | None = None
    #: copy the posts of this folder that the queue has never seen into it (demos)
    seed_from: Path | None = None
    max_chars: int = Field(default=3000, ge=1)
    banned_phrases: list[str] = Field(default_factory=list)
    #: a post this similar (Jaccard index of word sets) to a published one is refused
    near_duplicate: float = Field(default=0.9, gt=0, le=1)
    #: published posts remembered for the near-duplicate check
    remember: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _one_target(self) -> PublisherParams:
        if (self.target_dir is None) == (self.target_url is None):
            raise ValueError("give exactly one of target_dir or target_url")
        return self


class FrontMatter(BaseModel):
    """What a post's front matter must hold."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    title: str = Field(min_length=1, max_length=300)
    risk: Literal["normal", "high"] = "normal"


@dataclass(frozen=True, slots=True)
class Post:
    """One queued post, parsed."""

    path: Path
    meta: FrontMatter
    body: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.meta.title}\n{self.body}".encode()).hexdigest()


@dataclass(slots=True)
class Summary:
    """What one run did; the run's result (and its partial value if a guard stops it)."""

    published: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    waiting_approval: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    deferred: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def parse_post(path: Path) -> Post:
    """Read and check one post. Raises ``ValueError`` saying which file and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise ValueError(f"{path}:1: no front matter: start with '---', the keys, then '---'")
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 2 if mark is not None else 1  # +1 for 1-based, +1 for the '---'
        why = getattr(exc, "problem", None) or exc
        raise ValueError(f"{path}:{line}: front matter is not valid YAML: {why}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}:2: front matter must be 'key: value' lines")
    try:
        front = FrontMatter.model_validate(meta)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(f"{path}: front matter: {problems}") from None
    return Post(path, front, match.group(2).strip() + "\n")


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def gatekeeper(post: Post, params: PublisherParams, published: dict[str, str]) -> None:
    """Raise ``ValueError`` saying why ``post`` must not be published."""
    body = post.body.strip()
    if not body:
        raise ValueError("the body is empty")
    if len(body) > params.max_chars:
        raise ValueError(f"the body has {len(body)} characters, over max_chars {params.max_chars}")
    text = f"{post.meta.title}\n{body}".lower()
    for phrase in params.banned_phrases:
        if phrase.lower() in text:
            raise ValueError(f"it contains the banned phrase {phrase!r}")
    mine = words(text)
    for other_id, other in published.items():
        theirs = set(other.split())
        similarity = len(mine & theirs) / max(1, len(mine | theirs))
        if other_id != post.meta.id and similarity >= params.near_duplicate:
            raise ValueError(
                f"it nearly repeats published post {other_id!r} "
                f"(similarity {similarity:.2f}, limit {params.near_duplicate})"
            )


def _receipt(post: Post, location: str) -> dict[str, Any]:
    return {"id": post.meta.id, "sha256": post.sha256, "location": location}


def write_to_folder(target: Path, post: Post, idempotency_key: str) -> dict[str, Any]:
    """The folder target: write ``<id>.md`` atomically (a reader never sees half a post)."""
    target.mkdir(parents=True, exist_ok=True)
    dest = target / f"{post.meta.id}.md"
    head = {"id": post.meta.id, "title": post.meta.title, "idempotency_key": idempotency_key}
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(f"---\n{yaml.safe_dump(head, sort_keys=False)}---\n{post.body}")
    os.replace(tmp, dest)
    return _receipt(post, str(dest))


def found_in_folder(target: Path, post: Post) -> dict[str, Any] | bool:
    """Reconcile an interrupted folder write: the file is there, or it is not."""
    dest = target / f"{post.meta.id}.md"
    return _receipt(post, str(dest)) if dest.exists() else False


async def post_to_api(
    ctx: RunContext, url: str, post: Post, idempotency_key: str
) -> dict[str, Any]:
    """The HTTP target (``ctx.http`` sends the ``Idempotency-Key`` header by itself).

    Raises ``EffectNotStarted`` when the post certainly did not get there; any other error
    (a reset after sending, a 5xx) leaves the outcome unknown, held for a human.
    """
    body = {"id": post.meta.id, "title": post.meta.title, "body": post.body}
    try:
        response = await ctx.http.post(url, json=body)
    except (httpx2.ConnectError, httpx2.ConnectTimeout, CallRefused) as exc:
        raise EffectNotStarted(f"POST {url}: nothing sent: {exc}") from exc
    if 400 <= response.status_code < 500:
        raise EffectNotStarted(f"POST {url}: the target refused the post: {response.status_code}")
    response.raise_for_status()
    return _receipt(post, response.headers.get("location", url))


def move(path: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(path, folder / path.name)


def reject(summary: Summary, post: Post, why: str) -> bool:
    summary.rejected[post.meta.id] = why
    move(post.path, post.path.parent / "rejected")
    return True


def seed(queue: Path, source: Path) -> None:
    """Copy posts the queue has never seen (by file name) from ``source``."""
    seen = {p.name for d in (queue, queue / "published", queue / "rejected") for p in d.glob("*")}
    for src in sorted(source.glob("*.md")):
        if src.name not in seen:
            shutil.copyfile(src, queue / src.name)


async def publish(ctx: RunContext, params: PublisherParams, post: Post, summary: Summary) -> bool:
    """Publish one post through the ledger and move its file; False when the rate limit says
    to stop for now. Raises ``ApprovalPending`` for a high-risk post that waits for a human."""
    pid, published = post.meta.id, ctx.state["published"]
    if params.target_dir is not None:
        fn: Any = partial(write_to_folder, params.target_dir, post)
        reconcile: Any = partial(found_in_folder, params.target_dir, post)
    else:
        fn, reconcile = partial(post_to_api, ctx, str(params.target_url), post), None
    try:
        receipt = await ctx.effect(
            "post",
            pid,
            fn,
            params={"id": pid, "title": post.meta.title, "body": post.body},
            validate=lambda _params: gatekeeper(post, params, published),
            reconcile=reconcile,
            high_risk=post.meta.risk == "high",
            reason=f"{post.path.name} is marked risk: high",
        )
    except EffectHeld as exc:  # an earlier attempt may have published it: a human decides
        summary.held.append(pid)
        ctx.log.error("publisher.held", post=pid, error=str(exc))
        return True
    except EffectRejected as exc:  # a human said no, or the approval expired
        return reject(summary, post, str(exc))
    except EffectRefused as exc:
        if exc.reason == "rate_limited":
            ctx.log.info("publisher.rate_limited", post=pid, error=str(exc))
            return False
        if exc.reason != "invalid_params":  # not_allowed, params_changed: for an operator
            raise
        return reject(summary, post, str(exc))  # the gatekeeper said no
    if receipt and receipt.get("sha256") != post.sha256:
        return reject(summary, post, f"id {pid!r} was already published with another text")
    published[pid] = " ".join(sorted(words(f"{post.meta.title}\n{post.body}")))
    while len(published) > params.remember:
        del published[next(iter(published))]
    move(post.path, params.queue / "published")  # only now: a crash before this is healed next run
    summary.published.append(pid)
    ctx.log.info("publisher.published", post=pid, receipt=receipt)
    return True


async def publisher(ctx: RunContext, params: PublisherParams) -> dict[str, Any]:
    """Publish what the queue holds, within the gatekeeper's checks and the rate limit."""
    params.queue.mkdir(parents=True, exist_ok=True)
    if params.seed_from is not None:
        seed(params.queue, params.seed_from)
    ctx.state.setdefault("published", {})  # post id -> its words, for the near-duplicate check
    summary = Summary()
    ctx.partial(summary)  # kept as the result if a guard stops the run
    pending: ApprovalPending | None = None
    files = sorted(params.queue.glob("*.md"))
    for n, path in enumerate(files):
        with ctx.step(f"post:{path.name}"):
            try:
                post = parse_post(path)
            except (ValueError, OSError) as exc:  # skipped, and left in the queue
                summary.skipped += 1
                summary.errors.append(str(exc))
                ctx.log.error("publisher.invalid_post", file=str(path), error=str(exc))
                continue
            try:
                if not await publish(ctx, params, post, summary):
                    summary.deferred = len(files) - n
                    break
            except ApprovalPending as exc:
                summary.waiting_approval.append(post.meta.id)
                pending = pending or exc
    if pending is not None:  # the run ends awaiting_approval, the summary as its partial
        ctx.partial(asdict(summary))
        raise pending
    return asdict(summary)
