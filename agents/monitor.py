"""monitor: check endpoints; alert once when one goes down, and once when it recovers.

Checks run at once, each within its timeout: ``http`` (status, body text, latency), ``tcp`` (a
port opens), ``tls`` (a trusted certificate with ``min_days`` left). Each check's status is
kept in ``ctx.state``; an alert goes out only on a change, ``down`` then ``recovered``. The
change is recorded in state before the alert is sent, under the effect key
``<check>:<transition>:<timestamp>``: a retried run, or the next one, sends the same alert
under the same key, and the ledger never lets it out twice. A down alert carries a "likely
cause" line, from a model if one answers, else from the rules below.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import httpx2
from anyio.streams.tls import TLSAttribute
from pydantic import BaseModel, Field, model_validator

from supervisor import (
    BudgetExceeded,
    CallRefused,
    EffectError,
    EffectNotStarted,
    RunContext,
    TransientError,
)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

#: (regex found in the failure, likely cause): the rule-based triage; the first match wins
CAUSES = (
    ("refused", "nothing listens on the port: the service is stopped or crashed"),
    ("timeout", "the host is unreachable or overloaded: network, firewall or load"),
    ("not known|name resolution", "the name does not resolve: DNS, or a typo in the check"),
    ("certificate", "the TLS certificate is expired, untrusted or about to expire: renew it"),
    ("http 5", "the service runs but fails: read its logs"),
    ("http 4", "wrong URL or credentials, or the page was removed"),
    ("lacks", "the page changed, or an error page was served"),
    ("took", "the service is slow: overload or a slow dependency"),
)


class HttpCheck(BaseModel):
    """``GET url``: up on ``expect_status``, with ``expect_text`` in the body, in time."""

    type: Literal["http"]
    name: str = Field(pattern=_NAME)
    url: str
    expect_status: int = 200
    expect_text: str | None = None
    max_latency: float = Field(default=5.0, gt=0)


class TcpCheck(BaseModel):
    """Up when a connection to ``host:port`` opens."""

    type: Literal["tcp"]
    name: str = Field(pattern=_NAME)
    host: str
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(default=5.0, gt=0)


class TlsCheck(BaseModel):
    """Up when the TLS handshake succeeds and the certificate has ``min_days`` left."""

    type: Literal["tls"]
    name: str = Field(pattern=_NAME)
    host: str
    port: int = Field(default=443, ge=1, le=65535)
    min_days: float = Field(default=14.0, ge=0)
    timeout: float = Field(default=10.0, gt=0)
    #: trust this CA bundle instead of the system's (a private CA)
    ca_file: Path | None = None


Check = Annotated[HttpCheck | TcpCheck | TlsCheck, Field(discriminator="type")]


class MonitorParams(BaseModel):
    """Params of the monitor agent: the checks and one alert target."""

    checks: list[Check] = Field(min_length=1)
    #: POST each alert here as JSON (Slack-compatible ``text`` plus the details)...
    alert_url: str | None = None
    #: ...or append it to this JSON-lines file
    alert_file: Path | None = None
    #: model alias for the "likely cause" line of down alerts; None: rules only
    triage_alias: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MonitorParams:
        if (self.alert_url is None) == (self.alert_file is None):
            raise ValueError("give exactly one of alert_url or alert_file")
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be unique: {names}")
        return self


def why(exc: BaseException) -> str:
    """The error, with the most specific reason in its chain ("Connection refused")."""
    text, cause = str(exc) or type(exc).__name__, exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            errno = cause.errno or 0  # asyncio's strerror is "Connect call failed (...)"
            return f"{text} ({os.strerror(errno) if errno > 0 else cause.strerror})"
        cause = cause.__cause__ or cause.__context__
    return text


async def check_http(ctx: RunContext, c: HttpCheck, now: datetime) -> tuple[bool, str]:
    t0 = ctx.clock.monotonic()
    try:
        response = await ctx.http.get(c.url)
    except httpx2.TransportError as exc:
        return False, f"GET {c.url}: {type(exc).__name__}: {why(exc)}"
    took = ctx.clock.monotonic() - t0
    where = f"GET {c.url}: HTTP {response.status_code}"
    if response.status_code != c.expect_status:
        return False, f"{where}, expected {c.expect_status}"
    if c.expect_text is not None and c.expect_text not in response.text:
        return False, f"{where}, the body lacks {c.expect_text!r}"
    if took > c.max_latency:
        return False, f"{where}, took {took:.2f}s, over {c.max_latency}s"
    return True, f"{where} in {took:.3f}s"


async def check_tcp(ctx: RunContext, c: TcpCheck, now: datetime) -> tuple[bool, str]:
    try:
        with anyio.fail_after(c.timeout):
            stream = await anyio.connect_tcp(c.host, c.port)
        await stream.aclose()
    except OSError as exc:  # TimeoutError (fail_after) is one too
        return False, f"tcp {c.host}:{c.port}: {why(exc)}"
    return True, f"tcp {c.host}:{c.port}: open"


async def check_tls(ctx: RunContext, c: TlsCheck, now: datetime) -> tuple[bool, str]:
    where = f"tls {c.host}:{c.port}"
    context = ssl.create_default_context(cafile=str(c.ca_file) if c.ca_file else None)
    try:
        with anyio.fail_after(c.timeout):
            stream = await anyio.connect_tcp(
                c.host, c.port, ssl_context=context, tls_standard_compatible=False
            )
        cert: Any = stream.extra(TLSAttribute.peer_certificate)  # verified: never None
        await stream.aclose()
    except OSError as exc:  # ssl.SSLError is one too
        return False, f"{where}: {why(exc)}"
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), UTC)
    days = (expires - now).total_seconds() / 86400
    if days < c.min_days:
        return False, f"{where}: certificate expires in {days:.1f} days ({expires:%Y-%m-%d})"
    return True, f"{where}: certificate valid for {days:.0f} more days"


PROBES: dict[str, Any] = {"http": check_http, "tcp": check_tcp, "tls": check_tls}


async def run_checks(ctx: RunContext, params: MonitorParams) -> dict[str, tuple[bool, str]]:
    """Run every check at once: check name -> (up, detail). Raises what a check raised
    besides its own failure (a guard, a host not allowed) as itself, not in a group."""
    now = ctx.clock.now()
    results: dict[str, tuple[bool, str]] = {}
    errors: list[Exception] = []

    async def run(c: HttpCheck | TcpCheck | TlsCheck) -> None:
        try:
            with ctx.step(f"check:{c.name}"):
                results[c.name] = await PROBES[c.type](ctx, c, now)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for c in params.checks:
            tg.start_soon(run, c)
    if errors:
        raise errors[0]
    return {c.name: results[c.name] for c in params.checks}


async def triage(ctx: RunContext, params: MonitorParams, name: str, detail: str) -> str:
    """One line: the likely cause of a failure. Never raises: an alert must not wait on it."""
    rules = next((c for rx, c in CAUSES if re.search(rx, detail, re.I)), "unknown: look at it")
    if params.triage_alias is None:
        return rules
    prompt = f"Check {name!r} failed:\n{ctx.untrusted(detail, limit=1000, label='check')}"
    system = "You triage monitoring alerts. Answer with one short line: the likely cause."
    try:
        answer = await ctx.llm.complete(
            params.triage_alias,
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            max_tokens=60,
            fallback=lambda: rules,
        )
    except (BudgetExceeded, CallRefused) as exc:
        ctx.log.warning("monitor.triage_refused", check=name, error=str(exc))
        return rules
    lines = str(answer.value).strip().splitlines()
    return lines[0][:200] if lines else rules


def append_alert(path: Path, alert: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
    """The file target: one JSON line per alert, on disk before it counts as sent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({**alert, "idempotency_key": idempotency_key}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return {"file": str(path)}


def alert_in_file(path: Path, key: str) -> dict[str, Any] | bool:
    """Reconcile an interrupted append: is the alert's line in the file?"""
    found = path.exists() and f'"key": {json.dumps(key)}' in path.read_text(encoding="utf-8")
    return {"file": str(path)} if found else False


async def post_alert(ctx: RunContext, url: str, alert: dict[str, Any], ikey: str) -> Any:
    """The webhook target. Raises ``EffectNotStarted`` when the alert certainly did not go."""
    try:
        response = await ctx.http.post(url, json=alert)
    except (httpx2.ConnectError, httpx2.ConnectTimeout, CallRefused) as exc:
        raise EffectNotStarted(f"POST {url}: {exc}") from exc
    if response.status_code >= 400:  # the receiver answered that it took nothing
        raise EffectNotStarted(f"POST {url}: HTTP {response.status_code}")
    return {"status": response.status_code}


async def observe(ctx: RunContext, params: MonitorParams, name: str, up: bool, detail: str) -> Any:
    """Record the check's status in state. A change records the alert it calls for, before
    it is sent, so that every retry sends it under the same key."""
    checks: dict[str, Any] = ctx.state.setdefault("checks", {})
    entry = checks.get(name)
    if entry is None or entry["up"] != up:
        # Up at first sight, or after an outage whose alert never went out: nothing to say.
        change = "down" if not up else "recovered" if entry and entry["alerted"] else None
        entry = checks[name] = {
            "up": up,
            "since": ctx.clock.now().isoformat(),
            "before": entry["since"] if entry else None,
            "alert": change,
            "alerted": change is None,
            "cause": await triage(ctx, params, name, detail) if change == "down" else None,
        }
    entry["detail"] = detail
    return entry


async def send(ctx: RunContext, params: MonitorParams, name: str, entry: dict[str, Any]) -> Any:
    """Send the alert ``entry`` calls for, once per check, transition and timestamp."""
    key, since = f"{name}:{entry['alert']}:{entry['since']}", entry["since"]
    if entry["alert"] == "down":
        text = f"DOWN {name} since {since}: {entry['detail']} (likely cause: {entry['cause']})"
    else:
        text = f"RECOVERED {name} at {since} (down since {entry['before']})"
    alert = {"text": text, "key": key, "check": name, "transition": entry["alert"], "since": since}
    alert |= {"detail": entry["detail"], "cause": entry["cause"]}
    if params.alert_file is not None:
        write = partial(append_alert, params.alert_file, alert)
        found = partial(alert_in_file, params.alert_file, key)
        return await ctx.effect("alert", key, write, reconcile=found)
    return await ctx.effect("alert", key, partial(post_alert, ctx, str(params.alert_url), alert))


async def monitor(ctx: RunContext, params: MonitorParams) -> dict[str, Any]:
    """Run every check; alert on each change of status."""
    results = await run_checks(ctx, params)
    summary = {name: "up" if up else "down" for name, (up, _) in results.items()}
    ctx.partial(summary)
    for gone in set(ctx.state.get("checks", {})) - set(results):  # removed from the config
        del ctx.state["checks"][gone]
    unsent: list[str] = []
    for name, (up, detail) in results.items():
        entry = await observe(ctx, params, name, up, detail)
        if entry["alerted"]:
            continue
        try:
            await send(ctx, params, name, entry)
        except (EffectNotStarted, httpx2.HTTPError, OSError) as exc:  # stays pending: retried
            ctx.log.error("monitor.alert_not_sent", check=name, error=str(exc))
            unsent.append(f"{name}: {exc}")
            continue
        except EffectError as exc:  # held for a human, or refused by a rule: not ours to retry
            ctx.log.error("monitor.alert_dropped", check=name, error=str(exc))
        entry["alerted"] = True
    if unsent:  # pending in state: the run-level retry, or the next run, sends them
        raise TransientError(f"{len(unsent)} alert(s) not sent: " + "; ".join(unsent))
    return summary
