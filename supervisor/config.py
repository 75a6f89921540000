"""The configuration: one YAML file, validated once, frozen.

Sources, in order of precedence (highest first; decided in one place,
``SupervisorConfig.settings_customise_sources``):

1. environment variables ``AGENT_SUPERVISOR_<KEY>``, ``__`` for nesting
   (``AGENT_SUPERVISOR_METRICS__LISTEN=127.0.0.1:0``);
2. the YAML file;
3. the defaults below.

Secrets never come from YAML: they come from ``AGENT_SUPERVISOR_SECRETS__<NAME>`` or from
files in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``). This module is the only one
that reads ``os.environ``.

Every problem is reported with the file, line and key path, and all problems are reported at
once: ``config.yaml:14: agents[2].schedule: invalid cron expression '*/70 * * * *'``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from supervisor.durations import Duration
from supervisor.effects.config import AgentEffectsConfig, EffectsConfig
from supervisor.errors import ConfigError, ConfigProblem
from supervisor.guards.loops import (
    DetectorMode,
    LoopPolicy,
    ProgressPolicy,
    RepeatPolicy,
    StallPolicy,
)
from supervisor.guards.retry import RetryPolicy
from supervisor.llm.config import AgentLLMConfig, LLMConfig
from supervisor.yamlsrc import YamlDocument, YamlSyntaxError, format_path, load_yaml

ENV_PREFIX = "AGENT_SUPERVISOR_"
#: keys whose value is the NAME of a secret, never the secret itself
_SECRET_REFERENCES = frozenset({"secret", "webhook_url_secret"})
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_SECRET_KEY = re.compile(
    r"(^|_)(api_?key|apikey|token|secret|password|passwd|authorization|bearer)$", re.I
)

AgentFn = Callable[..., typing.Awaitable[Any]]

#: the environment ``load_config`` was given; read by the settings' env source
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("_ENVIRON", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """The env source, reading the mapping passed to ``load_config`` instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # case-insensitive, like the default source (case_sensitive is False)
        return {k.lower(): v for k, v in self._environ.items()}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Model):
    """When an agent fires: a 5-field cron expression (with timezone) or a fixed interval."""

    cron: str | None = None
    every: Duration | None = Field(default=None, gt=0)
    timezone: str | None = None
    #: random delay added to each fire, spreading agents that share a tick
    jitter: Duration = Field(default=0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # "*/5 * * * *" is cron; "every 30s" / "@every 30s" is an interval.
        if isinstance(value, str):
            text = value.strip()
            m = re.fullmatch(r"@?every\s+(.+)", text)
            return {"every": m.group(1)} if m else {"cron": text}
        return value

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        from supervisor.scheduler import validate_schedule

        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of 'cron' or 'every'")
        validate_schedule(self)
        return self

    @property
    def expected_interval(self) -> float:
        """Seconds between fires (for cron: the gap between the next two fires)."""
        from supervisor.scheduler import expected_interval

        return expected_interval(self)


class RetryConfig(_Model):
    """Run-level retry of transient failures (unset keys inherit ``defaults.guards.retry``)."""

    attempts: int | None = Field(default=None, ge=1, le=100)
    base_delay: Duration | None = Field(default=None, ge=0)
    max_delay: Duration | None = Field(default=None, ge=0)
    max_total: Duration | None = Field(default=None, ge=0)
    #: extra exception classes ("module:Class") treated as transient
    transient: list[str] | None = None

    @field_validator("transient")
    @classmethod
    def _importable(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            _import_exception(item)
        return value


class CircuitConfig(_Model):
    """Per-agent circuit breaker (unset keys inherit ``defaults.guards.circuit``)."""

    failures: int | None = Field(default=None, ge=0)
    cooldown: Duration | None = Field(default=None, gt=0)


DetectorModeName = Literal["enforce", "warn", "off"]


class RepeatConfig(_Model):
    """Repeated identical calls (unset keys inherit ``defaults.guards.repeat``)."""

    mode: DetectorModeName | None = None
    #: identical calls allowed in a row (or within ``window``); the next one is refused
    max_repeats: int | None = Field(default=None, ge=1)
    #: also count identical calls that are not in a row, within this long; 0 turns it off
    window: Duration | None = Field(default=None, ge=0)


class NoProgressConfig(_Model):
    """Steps that change nothing (unset keys inherit ``defaults.guards.no_progress``)."""

    mode: DetectorModeName | None = None
    #: steps in a row with no new state, effect, output or step name
    max_idle_steps: int | None = Field(default=None, ge=1)


class StallConfig(_Model):
    """No step and no call starting or ending (unset keys inherit ``defaults.guards.stall``)."""

    mode: DetectorModeName | None = None
    #: silence allowed; keep it above the longest legitimate single call
    max_silence: Duration | None = Field(default=None, gt=0)


class GuardsConfig(_Model):
    """Guards of a run; in an agent, unset keys inherit ``defaults.guards``."""

    timeout: Duration | None = Field(default=None, gt=0)
    cleanup_grace: Duration | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)
    repeat: RepeatConfig = Field(default_factory=RepeatConfig)
    no_progress: NoProgressConfig = Field(default_factory=NoProgressConfig)
    stall: StallConfig = Field(default_factory=StallConfig)


BUILTIN_GUARDS = GuardsConfig(
    timeout=300.0,
    cleanup_grace=5.0,
    max_steps=200,
    retry=RetryConfig(attempts=3, base_delay=1.0, max_delay=60.0, max_total=300.0, transient=[]),
    circuit=CircuitConfig(failures=5, cooldown=900.0),
    repeat=RepeatConfig(mode="enforce", max_repeats=5, window=0.0),
    no_progress=NoProgressConfig(mode="warn", max_idle_steps=20),
    stall=StallConfig(mode="warn", max_silence=120.0),
)


class DefaultsConfig(_Model):
    """Values every agent inherits unless it overrides them."""

    guards: GuardsConfig = Field(default_factory=GuardsConfig)


class AgentHTTPConfig(_Model):
    """Per-agent ``ctx.http`` settings: egress allow list, timeouts, retries."""

    #: hosts ctx.http may reach: exact names or patterns like ``*.example.com``; empty = none
    allow_hosts: list[str] = Field(default_factory=list)
    timeout: Duration = Field(default=30.0, gt=0)
    connect_timeout: Duration = Field(default=5.0, gt=0)
    #: retries of idempotent requests (GET, PUT, DELETE, ...) on transient failures
    retries: int = Field(default=2, ge=0, le=10)
    #: log request and response bodies (truncated, redacted)
    log_bodies: bool = False


TakeoverChoice = Literal["rerun", "next"]


class ClusterConfig(_Model):
    """Scale-out: several daemons sharing one PostgreSQL ``store`` (see docs/cluster.md).

    Used only when ``store`` is a ``postgresql://`` URL; every time here is a duration.
    """

    #: this node's name, unique in the cluster; default: the host name
    node: str = Field(default="", pattern=r"^$|" + _NAME)
    #: how long a claimed fire stays this node's without a renewal (renewed every lease/3);
    #: a node that stops renewing loses its runs to a takeover after at most this long
    lease: Duration = Field(default=30.0, ge=1)
    #: how often each node looks for claims whose lease ran out
    check_interval: Duration = Field(default=5.0, gt=0)
    #: how often each node writes its heartbeat
    heartbeat_interval: Duration = Field(default=5.0, gt=0)
    #: a node whose heartbeat is older than this is gone: its pending effects become unknown
    node_ttl: Duration = Field(default=30.0, gt=0)
    #: what to do with a fire whose node died mid-run: run it again now on a live node
    #: (``rerun``), or leave it and run the next fire as usual (``next``); per agent too
    takeover: TakeoverChoice = "rerun"
    #: a fire is taken over at most this many times (a run that kills its node each time
    #: must not take the whole cluster down one node after another)
    max_takeovers: int = Field(default=1, ge=0, le=10)
    #: before claiming a fire, a node waits this long per run it has in flight (up to
    #: ``claim_delay_max``), so that idler nodes win more claims
    claim_delay_per_run: Duration = Field(default=0.02, ge=0)
    claim_delay_max: Duration = Field(default=0.5, ge=0)
    #: finished claims are deleted once their fire is older than this
    keep_claims: Duration = Field(default=7 * 86400.0, ge=3600)

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.check_interval > self.lease:
            raise ValueError("check_interval must not be longer than lease")
        if self.node_ttl < 2 * self.heartbeat_interval:
            raise ValueError("node_ttl must be at least twice heartbeat_interval")
        if self.node_ttl < self.lease:
            raise ValueError(
                "node_ttl must be at least lease (a node's effects are declared unknown only "
                "after its runs' leases ran out)"
            )
        return self


class AgentConfig(_Model):
    """One agent of the fleet."""

    name: str = Field(pattern=_NAME)
    run: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    schedule: ScheduleConfig
    enabled: bool = True
    description: str = ""
    #: runs of this agent allowed at the same time
    max_concurrent: int = Field(default=1, ge=1)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    llm: AgentLLMConfig = Field(default_factory=AgentLLMConfig)
    effects: AgentEffectsConfig = Field(default_factory=AgentEffectsConfig)
    http: AgentHTTPConfig = Field(default_factory=AgentHTTPConfig)
    #: cluster mode: this agent's takeover policy (default ``cluster.takeover``)
    takeover: TakeoverChoice | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class MetricsConfig(_Model):
    """The Prometheus endpoint."""

    enabled: bool = True
    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _hostport(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class ControlConfig(_Model):
    """The control API (a Unix socket) used by the CLI."""

    enabled: bool = True
    #: the socket's path; default ``$RUNTIME_DIRECTORY/control.sock`` under systemd,
    #: else ``<state_dir>/control.sock``
    socket: Path | None = None
    #: permissions of the socket file: owner and group may connect (the access control)
    mode: int = Field(default=0o660, ge=0, le=0o777)


class TracesConfig(_Model):
    """Run traces kept per agent as JSON lines under ``<state_dir>/traces``."""

    enabled: bool = True
    #: a file past this many bytes is cut to its newest half
    max_bytes_per_agent: int = Field(default=1 << 20, ge=4096)


class SupervisorConfig(BaseSettings):
    """The whole configuration file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    state_dir: Path = Path("/var/lib/agent-supervisor")
    #: where durable state lives: empty for JSON files under ``state_dir`` (the embedded
    #: default), or ``postgresql://user@host:5432/db[?schema=name]`` to keep agent state, the
    #: effect ledger, approvals, budgets and fire claims in PostgreSQL (required by a
    #: cluster). Give a password through the environment (AGENT_SUPERVISOR_STORE, PGPASSWORD
    #: or ~/.pgpass), never in the file.
    store: str = ""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: default timezone of cron schedules
    timezone: str = "UTC"
    #: multiplies every ``every:`` interval (cron schedules are not scaled); for demos and
    #: end-to-end tests: AGENT_SUPERVISOR_SCHEDULE_SCALE=0.01 runs an hourly agent every 36 s
    schedule_scale: float = Field(default=1.0, gt=0, le=1000)
    #: global cap on runs in flight; further fires wait for a slot
    max_concurrent_runs: int = Field(default=16, ge=1)
    #: fires missed while the daemon was down run once at start if they are this recent
    misfire_grace: Duration = Field(default=300.0, ge=0)
    #: on SIGTERM, how long runs in flight may take to finish before they are cancelled
    shutdown_grace: Duration = Field(default=30.0, ge=0)
    #: recent errors kept per agent in its state file
    keep_errors: int = Field(default=20, ge=0, le=1000)
    #: extra directories put on sys.path to import agents (relative to the config file)
    agent_paths: list[str] = Field(default_factory=list)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    effects: EffectsConfig = Field(default_factory=EffectsConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    traces: TracesConfig = Field(default_factory=TracesConfig)
    agents: list[AgentConfig] = Field(default_factory=list)
    #: secrets, from the environment only; never from YAML
    secrets: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        value = value.strip()
        if value and not value.lower().startswith(("postgresql://", "postgres://")):
            raise ValueError(
                f"expected a postgresql:// URL (or nothing, for JSON files in state_dir), got "
                f"{value.split('://')[0]!r}"
            )
        schema = parse_qs(urlsplit(value).query).get("schema", [""])[-1]
        if schema and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
            raise ValueError(
                f"invalid schema name {schema!r} in store: use 1-63 of A-Z a-z 0-9 _, not "
                "starting with a digit"
            )
        return value

    @property
    def clustered(self) -> bool:
        """True when state lives in PostgreSQL: every fire is claimed there first."""
        return bool(self.store)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from supervisor.scheduler import validate_timezone

        validate_timezone(value)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML document is passed as init kwargs; the environment overrides it.
        environ = _ENVIRON.get()
        if environ is not None:  # load_config's environ=, never os.environ behind its back
            env_settings = _MappingEnvSource(settings_cls, environ)
        return (env_settings, init_settings)


@dataclass(frozen=True, slots=True)
class ResolvedGuards:
    """The guards of one agent after inheritance: every value set."""

    timeout: float
    cleanup_grace: float
    max_steps: int
    retry: RetryPolicy
    transient: tuple[type[BaseException], ...]
    circuit_failures: int
    circuit_cooldown: float
    loops: LoopPolicy = field(default_factory=LoopPolicy)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """An agent ready to run: its config, its imported function and validated params."""

    config: AgentConfig
    fn: AgentFn | None
    params: Any
    guards: ResolvedGuards
    line: int | None = None
    #: whether the agent function takes ``(ctx, params)`` rather than ``(ctx)``
    takes_params: bool = True

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config file: settings, agents by name, and a hash to compare nodes."""

    path: Path
    settings: SupervisorConfig
    agents: dict[str, AgentSpec]
    digest: str
    secret_values: tuple[str, ...] = field(default=(), repr=False)
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def control_socket(self) -> Path:
        """Where the control API listens (and where the CLI connects)."""
        return control_socket_path(self.settings, self.environ)

    @property
    def secrets(self) -> dict[str, str]:
        """Secret name -> value (lower-case names), for services that need credentials."""
        return {k: v.get_secret_value() for k, v in self.settings.secrets.items()}

    def agent(self, name: str) -> AgentSpec:
        return self.agents[name]

    @property
    def fleet_digest(self) -> str:
        """A short digest of what the nodes of a cluster must agree on: the settings and
        agents, without what is per node by design (node name, paths, listen addresses, log
        level, secrets, the store URL with its credentials)."""
        from supervisor.cluster.base import config_hash

        doc = self.settings.model_dump(mode="json", exclude=_PER_NODE)
        return config_hash(doc)


#: settings that may differ between the nodes of one cluster
_PER_NODE: Any = {
    "secrets": True,
    "state_dir": True,
    "store": True,
    "metrics": True,
    "control": True,
    "log_level": True,
    "agent_paths": True,
    "traces": True,
    "cluster": {"node"},
}


def load_config(
    path: str | Path, *, import_agents: bool = True, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Read, validate and resolve a config file.

    Raises ``ConfigError`` listing every problem, each with file:line and key path.
    """
    path = Path(path)
    env = os.environ if environ is None else environ
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigProblem(name, None, "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
        doc = load_yaml(text)
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(name, None, "", f"not UTF-8: {exc}")]) from None
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigProblem(name, exc.line, "", str(exc))]) from None

    problems = [
        ConfigProblem(name, line, format_path(p), "duplicate key") for p, line in doc.duplicates
    ]
    if not isinstance(doc.data, dict):
        problems.append(ConfigProblem(name, doc.line_of(()), "", "the top level must be a mapping"))
        raise ConfigError(problems)
    problems += _secret_literals(doc, name)
    problems += _store_password(doc, name)

    settings = _validate(doc, name, env, problems)
    if settings is None:
        raise ConfigError(problems)

    problems += _settings_problems(settings, doc, name)
    if import_agents:
        _extend_sys_path(settings, path.parent)
    agents: dict[str, AgentSpec] = {}
    seen: set[str] = set()  # not ``agents``: a name whose agent failed to import still counts
    for i, agent in enumerate(settings.agents):
        where = ("agents", i)
        if agent.name in seen:
            problems.append(
                ConfigProblem(
                    name,
                    doc.line_of((*where, "name")),
                    format_path((*where, "name")),
                    f"duplicate agent name {agent.name!r}",
                )
            )
            continue
        seen.add(agent.name)
        spec = _resolve_agent(agent, settings, doc, name, where, import_agents, problems)
        if spec is not None:
            agents[agent.name] = spec
    if problems:
        raise ConfigError(problems)

    secret_values = _secret_values(settings)
    digest = hashlib.sha256(raw).hexdigest()
    runtime = {k: env[k] for k in ("RUNTIME_DIRECTORY",) if k in env}
    return LoadedConfig(path, settings, agents, digest, secret_values, runtime)


def _settings_problems(
    settings: SupervisorConfig, doc: YamlDocument, name: str
) -> list[ConfigProblem]:
    """What the settings' own validators cannot see: where a value came from (file or
    default), and combinations across sections."""
    problems: list[ConfigProblem] = []
    if "cluster" in settings.model_fields_set and not settings.store:
        problems.append(
            ConfigProblem(
                name,
                doc.line_of(("cluster",)),
                "cluster",
                "cluster: is set but store: is not a postgresql:// URL; nodes share nothing "
                "without one",
            )
        )
    fallback = resolve_guards(settings.defaults.guards, GuardsConfig()).retry
    if fallback.base_delay > fallback.max_delay:
        retry_loc = ("defaults", "guards", "retry")
        problems.append(
            ConfigProblem(
                name,
                doc.line_of(retry_loc),
                format_path(retry_loc),
                "base_delay is larger than max_delay",
            )
        )
    return problems


def _validate(
    doc: YamlDocument, name: str, env: Mapping[str, str], problems: list[ConfigProblem]
) -> SupervisorConfig | None:
    data = dict(doc.data)
    if "secrets" in data:
        problems.append(
            ConfigProblem(
                name,
                doc.line_of(("secrets",)),
                "secrets",
                f"secrets are never read from YAML: set {ENV_PREFIX}SECRETS__<NAME> or put a "
                "file in $CREDENTIALS_DIRECTORY",
            )
        )
        data.pop("secrets")
    data["secrets"] = _collect_secrets(env)
    env_names = {k.upper() for k in env}
    token = _ENVIRON.set(env)
    try:
        settings = SupervisorConfig(**data)
    except SettingsError as exc:
        # pydantic-settings decodes lists and mappings from the environment as JSON, and
        # raises before any validation when one is not.
        m = re.search(r'field "(\w+)"', str(exc))
        key = m.group(1) if m else ""
        culprit = _env_var_of((key,), env_names) or f"{ENV_PREFIX}{key.upper()}"
        problems.append(
            ConfigProblem(
                name,
                None,
                key,
                f"{culprit} is not valid JSON ({exc.__cause__}); give lists and mappings as JSON",
            )
        )
        return None
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            line = doc.line_of(loc)
            msg = _message(err)
            var = _env_var_of(loc, env_names)
            if var is not None:
                # The value came from the environment: point at the key in the file only if
                # the file has it (the value there was overridden), never at an ancestor.
                line = doc.lines.get(loc)
                msg += f" (from environment {var})"
            problems.append(ConfigProblem(name, line, format_path(loc), msg))
        return None
    finally:
        _ENVIRON.reset(token)
    return None if problems else settings


def _env_var_of(loc: tuple[Any, ...], env_names: set[str]) -> str | None:
    """The ``AGENT_SUPERVISOR_`` variable that set the value at ``loc``, if one did."""
    parts = [str(p).upper() for p in loc]
    for n in range(len(parts), 0, -1):
        var = ENV_PREFIX + "__".join(parts[:n])
        if var in env_names:
            return var
    # A variable below ``loc`` (``AGENTS__0__ENABLED`` when ``agents`` is invalid).
    below = ENV_PREFIX + "__".join(parts) + "__"
    return min((v for v in env_names if v.startswith(below)), default=None)


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def _collect_secrets(env: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and Path(cred_dir).is_dir():
        for entry in sorted(Path(cred_dir).iterdir()):
            if entry.is_file():
                out[entry.name.lower()] = entry.read_text().strip()
    prefix = ENV_PREFIX + "SECRETS__"
    for key, value in env.items():
        if key.startswith(prefix):
            out[key[len(prefix) :].lower()] = value
    return out


def _secret_literals(doc: YamlDocument, name: str) -> list[ConfigProblem]:
    """A literal that looks like a credential in YAML is an error, not a warning."""
    found = []
    for p in doc.lines:
        # ``secret: NAME`` is a reference to a secret (``SecretRef``), not a secret.
        # ``secret: NAME`` and ``..._secret: NAME`` name a secret (a reference), not a secret.
        if (
            p
            and isinstance(p[-1], str)
            and p[-1] not in _SECRET_REFERENCES
            and _SECRET_KEY.search(p[-1])
        ):
            value: Any = doc.data
            for part in p:
                value = value[part]
            if isinstance(value, str) and value:
                found.append(
                    ConfigProblem(
                        name,
                        doc.lines[p],
                        format_path(p),
                        "looks like a secret: secrets are never read from YAML; name it in the "
                        f"environment ({ENV_PREFIX}SECRETS__<NAME>) or a credentials file",
                    )
                )
    return found


def _secret_values(settings: SupervisorConfig) -> tuple[str, ...]:
    """Every secret value the log redactor must hide, the store's password included."""
    values = tuple(v.get_secret_value() for v in settings.secrets.values())
    password = _url_password(settings.store) if settings.store else None
    return (*values, password, quote(password, safe="")) if password else values


def _url_password(url: str) -> str | None:
    """The password a libpq URL carries, in its user part or as ``?password=``, decoded."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    in_query = parse_qs(parts.query).get("password", [""])[-1]
    return unquote(parts.password) if parts.password else in_query or None


def _store_password(doc: YamlDocument, name: str) -> list[ConfigProblem]:
    """``store:`` in the file must not carry a password (give it through the environment)."""
    value = doc.data.get("store") if isinstance(doc.data, dict) else None
    if isinstance(value, str) and "://" in value:
        if _url_password(value.strip()):
            return [
                ConfigProblem(
                    name,
                    doc.line_of(("store",)),
                    "store",
                    "the URL holds a password: secrets are never read from YAML; set "
                    f"{ENV_PREFIX}STORE in the environment, or use PGPASSWORD or ~/.pgpass",
                )
            ]
    return []


def _extend_sys_path(settings: SupervisorConfig, base: Path) -> None:
    for entry in settings.agent_paths:
        p = (base / entry).resolve()
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def _resolve_agent(
    agent: AgentConfig,
    settings: SupervisorConfig,
    doc: YamlDocument,
    name: str,
    where: tuple[str | int, ...],
    import_agents: bool,
    problems: list[ConfigProblem],
) -> AgentSpec | None:
    def problem(sub: tuple[str | int, ...], msg: str) -> None:
        loc = (*where, *sub)
        problems.append(ConfigProblem(name, doc.line_of(loc), format_path(loc), msg))

    guards = resolve_guards(settings.defaults.guards, agent.guards)
    own = agent.guards.retry
    # A conflict inherited whole from defaults.guards is reported once, there.
    overrides = own.base_delay is not None or own.max_delay is not None
    if overrides and guards.retry.base_delay > guards.retry.max_delay:
        problem(("guards", "retry"), "base_delay is larger than max_delay")
    fn: AgentFn | None = None
    params: Any = agent.params
    if import_agents:
        try:
            fn = import_agent(agent.run)
        except (ImportError, AttributeError, TypeError) as exc:
            problem(("run",), str(exc))
            return None
        model = params_model(fn)
        if model is not None:
            try:
                params = model.model_validate(agent.params)
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    problem(("params", *err["loc"]), _message(err))
                return None
        elif agent.params and len(inspect.signature(fn).parameters) < 2:
            problem(("params",), f"{agent.run} takes no params")
            return None
    takes = fn is None or len(inspect.signature(fn).parameters) >= 2
    return AgentSpec(agent, fn, params, guards, doc.line_of(where), takes)


def resolve_guards(defaults: GuardsConfig, override: GuardsConfig) -> ResolvedGuards:
    """Inherit: agent override, then ``defaults.guards``, then the built-in defaults."""

    def pick(attr: str, *layers: Any) -> Any:
        for layer in layers:
            value = getattr(layer, attr)
            if value is not None:
                return value
        raise AssertionError(attr)  # the built-in layer sets everything

    g = (override, defaults, BUILTIN_GUARDS)
    r = tuple(x.retry for x in g)
    c = tuple(x.circuit for x in g)
    rp, npc, st = (tuple(getattr(x, k) for x in g) for k in ("repeat", "no_progress", "stall"))
    return ResolvedGuards(
        timeout=pick("timeout", *g),
        cleanup_grace=pick("cleanup_grace", *g),
        max_steps=pick("max_steps", *g),
        retry=RetryPolicy(
            max_attempts=pick("attempts", *r),
            base_delay=pick("base_delay", *r),
            max_delay=pick("max_delay", *r),
            max_total=pick("max_total", *r),
        ),
        transient=tuple(_import_exception(t) for t in pick("transient", *r)),
        circuit_failures=pick("failures", *c),
        circuit_cooldown=pick("cooldown", *c),
        loops=LoopPolicy(
            RepeatPolicy(
                DetectorMode(pick("mode", *rp)), pick("max_repeats", *rp), pick("window", *rp)
            ),
            ProgressPolicy(DetectorMode(pick("mode", *npc)), pick("max_idle_steps", *npc)),
            StallPolicy(DetectorMode(pick("mode", *st)), pick("max_silence", *st)),
        ),
    )


def import_agent(ref: str) -> AgentFn:
    """Import ``module:function`` and check it is an async function.

    Raises ``ImportError``, ``AttributeError`` or ``TypeError`` with an operator-facing message.
    """
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import agent module {module_name!r}: {exc}") from None
    except Exception as exc:  # an agent module that fails at import is a config problem
        raise ImportError(
            f"importing agent module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r}")
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{ref} must be an 'async def' function taking (ctx, params)")
    n = len(inspect.signature(fn).parameters)
    if n not in (1, 2):
        raise TypeError(f"{ref} must take (ctx) or (ctx, params), not {n} parameters")
    return typing.cast(AgentFn, fn)


def params_model(fn: AgentFn) -> type[BaseModel] | None:
    """The pydantic model annotated on the agent's second parameter, if any."""
    names = list(inspect.signature(fn).parameters)
    if len(names) < 2:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: treat params as a plain dict
        return None
    hint = hints.get(names[1])
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint
    return None


def _import_exception(ref: str) -> type[BaseException]:
    module_name, sep, attr = ref.replace(":", ".").rpartition(".")
    if not sep:
        module_name, attr = "builtins", ref
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ValueError(f"cannot import exception class {ref!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ValueError(f"{ref!r} is not an exception class")
    return obj


DEFAULT_CONFIG_PATH = "/etc/agent-supervisor/config.yaml"


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    """``$AGENT_SUPERVISOR_CONFIG`` or ``/etc/agent-supervisor/config.yaml``."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "CONFIG", DEFAULT_CONFIG_PATH)


def control_socket_path(settings: SupervisorConfig, environ: Mapping[str, str]) -> Path:
    """The control socket: configured, else under ``$RUNTIME_DIRECTORY``, else the state dir."""
    if settings.control.socket is not None:
        return settings.control.socket
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / "control.sock" if runtime else settings.state_dir / "control.sock"
