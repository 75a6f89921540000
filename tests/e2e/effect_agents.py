"""Agents that perform side effects against ``effect_target.EffectTarget``, for e2e tests.

Each takes the target's base URL as ``params.url``. Most use their own httpx2 client and send
the effect's idempotency key as the ``Idempotency-Key`` header themselves (the key ``fn``
receives); ``http_publisher`` uses ``ctx.http``, which adds the header by itself inside an
effect. The HTTP errors are left raw on purpose: the test config decides whether the
run-level retry treats them as transient, as the author of the incident's publisher did.
"""

from __future__ import annotations

from typing import Any

import httpx2

from supervisor import EffectHeld, RunContext

TIMEOUT = httpx2.Timeout(5.0)


def _poster(client: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> Any:
    """The effect: POST ``body`` to ``<url>/posts`` with the Idempotency-Key header."""

    async def post(idempotency_key: str) -> Any:
        response = await client.post(
            f"{url}/posts", json=body, headers={"Idempotency-Key": idempotency_key}
        )
        response.raise_for_status()
        return response.json()

    return post


def _lookup(client: httpx2.AsyncClient, url: str, key: str) -> Any:
    """The reconcile: ask the target "do you have post ``key``?" (None: cannot tell)."""

    async def reconcile() -> bool | None:
        try:
            response = await client.get(f"{url}/posts", params={"key": key})
            response.raise_for_status()
        except httpx2.HTTPError:
            return None
        return bool(response.json()["found"])

    return reconcile


async def publisher(ctx: RunContext, params: dict[str, Any]) -> Any:
    """The incident's publisher: one post, the same key on every run; with
    ``params.reconcile`` it can ask the platform whether the post exists."""
    url, key = params["url"], params.get("key", "launch")
    ctx.step("post")
    async with httpx2.AsyncClient(timeout=TIMEOUT) as client:
        return await ctx.effect(
            "post",
            key,
            _poster(client, url, {"key": key, "text": params.get("text", "Launch day!")}),
            reconcile=_lookup(client, url, key) if params.get("reconcile") else None,
        )


async def deployer(ctx: RunContext, params: dict[str, Any]) -> Any:
    """A high-risk effect (kind ``deploy``): waits for a human's approval."""
    url, version = params["url"], params["version"]
    ctx.step("deploy")
    async with httpx2.AsyncClient(timeout=TIMEOUT) as client:
        return await ctx.effect(
            "deploy",
            f"deploy-{version}",
            _poster(client, url, {"key": f"deploy-{version}", "version": version}),
            params={"version": version, "env": "prod"},
            reason=f"release {version} passed CI",
        )


async def counter_poster(ctx: RunContext, params: dict[str, Any]) -> Any:
    """A new post (a new key) on every run: only the kind's rate limit stops it."""
    n = int(ctx.state.get("n", 0)) + 1
    ctx.state["n"] = n  # committed even when the effect is refused: the next run moves on
    ctx.step("post")
    async with httpx2.AsyncClient(timeout=TIMEOUT) as client:
        return await ctx.effect(
            "post", f"post-{n}", _poster(client, params["url"], {"key": f"post-{n}"})
        )


async def overreacher(ctx: RunContext, params: dict[str, Any]) -> Any:
    """Posts (allowed), then tries a ``deploy`` its config does not allow."""
    url = params["url"]
    ctx.step("post")
    async with httpx2.AsyncClient(timeout=TIMEOUT) as client:
        await ctx.effect("post", "hello", _poster(client, url, {"key": "hello"}))
        ctx.step("deploy")
        return await ctx.effect("deploy", "sneaky", _poster(client, url, {"key": "sneaky"}))


async def batch_poster(ctx: RunContext, params: dict[str, Any]) -> Any:
    """Posts ``params.per_run`` keys per run, batch after batch, for the crash test.

    The batch number lives in ``ctx.state``, committed when the run ends: a run the daemon
    did not finish (killed) is redone from its first key by the next run, so every key it
    touched is asked for again (done: recorded result; unknown: reconcile or held).
    """
    url, per_run = params["url"], int(params.get("per_run", 5))
    batch = int(ctx.state.get("batch", 0))
    held: list[str] = []
    async with httpx2.AsyncClient(timeout=TIMEOUT) as client:
        for i in range(per_run):
            key = f"{ctx.agent}-b{batch}-{i}"
            ctx.step("post")
            try:
                await ctx.effect(
                    "post",
                    key,
                    _poster(client, url, {"key": key, "agent": ctx.agent}),
                    reconcile=_lookup(client, url, key) if params.get("reconcile") else None,
                )
            except EffectHeld:
                held.append(key)  # a human decides; never repeated on its own
    ctx.state["batch"] = batch + 1
    return {"batch": batch, "held": held}


async def http_publisher(ctx: RunContext, params: dict[str, Any]) -> Any:
    """Asks the platform through ``ctx.http`` (egress-limited) whether its post exists, then
    posts through ``ctx.http`` inside ``ctx.effect`` (the Idempotency-Key is added for it)."""
    url, key = params["url"], params.get("key", "via-http")
    ctx.step("lookup")
    known = (await ctx.http.get(f"{url}/posts", params={"key": key})).json()

    async def post(idempotency_key: str) -> Any:
        response = await ctx.http.post(f"{url}/posts", json={"key": key})
        response.raise_for_status()
        return response.json()

    ctx.step("post")
    result = await ctx.effect("post", key, post)
    return {"known_before": known["found"], "post": result}
