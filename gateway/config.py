"""config.toml -> frozen dataclasses, validated once at start.

A bad config is refused with one line naming the file, the key and the problem
(``ConfigError``). Secrets (the upstream key) come from the environment only and live in
``Secret``, whose ``repr`` hides them.

Long because: every section's dataclass and its checks are in one place, so a key's default,
type and validation read together. A table's known keys are its dataclass's fields
(``_keys``); the parser's literal defaults are held equal to the dataclasses' by
``tests/config/test_config.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.analysis import ANALYSIS_TYPES
from gateway.event_loop import EVENT_LOOPS, uvloop_installed

PERIODS = ("day", "week", "month", "total")


class ConfigError(Exception):
    """One clear line: file, key, problem."""


class Secret:
    """A string that never shows itself in repr/str/logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


# Labels the gateway gives requests that belong to no team: a team may not be called so.
RESERVED_TEAM_NAMES = frozenset({"unknown"})
# The ledger line the gateway charges its own cache audits to (gateway.core.service): not a team.
AUDIT_TEAM = "audit"


def env_secret(env: Mapping[str, str], name: str) -> str:
    """A secret from the environment, trimmed of surrounding whitespace: a value mounted from
    a file ends in a newline nobody means. Whoever reads a secret reads it through this."""
    return env.get(name, "").strip()


def file_secret(path: str, *, source: str, key: str) -> str:
    """A secret from a file (a Docker or Kubernetes secret), trimmed like ``env_secret``."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        problem = f"cannot read the secret file {path}: {reason}"
        raise ConfigError(f"{source}: {key}: {problem}") from None


def env_or_file_secret(env: Mapping[str, str], name: str, *, source: str, key: str) -> str:
    """The variable ``name``, or else the file named by ``name_FILE`` (the container
    convention for secrets); both set is a mistake, refused rather than guessed."""
    from_file = env.get(f"{name}_FILE", "").strip()
    if from_file and env.get(name, "").strip():
        raise ConfigError(f"{source}: {key}: both {name} and {name}_FILE are set; set one")
    if from_file:
        return file_secret(from_file, source=source, key=f"{key} ({name}_FILE)")
    return env_secret(env, name)


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form of a key, as written in config.toml."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# A [server] key read once at start (the listening socket, the app's middlewares and
# connection settings, run_app's shutdown timeout, the access log's writer, the event loop):
# a reload that changes it says a restart applies it. The other keys are read per request.
_RESTART = {"restart": True}


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_RESTART)
    port: int = field(default=8080, metadata=_RESTART)
    workers: int = field(default=1, metadata=_RESTART)
    cors_origins: tuple[str, ...] = field(default=(), metadata=_RESTART)
    max_inflight: int = 1024
    drain_timeout_s: float = field(default=30.0, metadata=_RESTART)
    drain_grace_s: float = 0.0
    access_log: bool = True
    # Access lines are written in batches of up to this many KB, or this long after the first
    # one, off the loop.
    access_log_buffer_kb: int = field(default=32, metadata=_RESTART)
    access_log_flush_ms: int = field(default=1000, metadata=_RESTART)
    # uvloop where installed, or "asyncio" / "uvloop"
    event_loop: str = field(default="auto", metadata=_RESTART)
    body_timeout_s: float = 60.0
    # Bodies still arriving are bounded on their own, not by max_inflight (which counts
    # requests whose body is in): a client trickling its body costs a socket, not a slot.
    max_receiving: int = 4096
    body_idle_timeout_s: float = 10.0  # no byte of the body for this long: 408
    body_min_rate: int = 1024  # bytes/s on average, checked once a body is 5 s old
    keepalive_timeout_s: float = field(default=75.0, metadata=_RESTART)


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "https://imagerecognize.com/api/v2/"
    api_key_env: str = "IMAGERECOGNIZE_API_KEY"
    timeout_s: float = 30.0
    max_concurrency: int = 64
    max_queue: int = 256
    retries: int = 2
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    max_answer_kb: int = 1024  # a longer upstream answer is not read past this (502)
    api_key_file: str = ""  # read the key from this file instead of api_key_env
    api_key: Secret = field(default_factory=lambda: Secret(""), repr=False)


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "sqlite"
    path: str = "data/gateway.db"
    cache_path: str = ""  # default: next to path, as <stem>-cache.db
    synchronous: str = "normal"  # SQLite: "normal" survives a killed process, "full" power loss
    busy_timeout_ms: int = 5000  # SQLite: how long a write waits for another process's lock
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "gw:"
    # Connections a process may open; a request waits for a free one rather than failing.
    # 0: server.max_inflight plus room for the background work.
    redis_max_connections: int = 0
    require_persistence: bool = False  # refuse a Redis that saves neither AOF nor RDB
    # High availability: the primary is found through Sentinel; ledger writes wait for this
    # many replicas to have them (WAIT), so a failover cannot lose an acknowledged charge.
    redis_sentinels: tuple[str, ...] = ()  # "host:port" of each sentinel
    redis_master_name: str = "mymaster"
    redis_min_replicas_ack: int = -1  # -1: 1 with Sentinel, else 0


@dataclass(frozen=True)
class CacheConfig:
    ttl_days: float = 30.0
    max_mb: float = 1024.0
    share_across_teams: bool = True
    coalesce_wait_s: float = 60.0
    # Redis: the cross-replica lock on a key in flight lives this long unless its holder
    # renews it (every third of it): how long a dead replica's lock holds the others up.
    coalesce_lock_s: float = 5.0
    stale_if_error_days: float = 7.0
    memory_mb: float = 64.0  # in-process copy of hot entries: a hit needs no store round trip
    derive: bool = True  # answer stricter requests from looser stored results (gateway.core.derive)
    widen: bool = False  # forward objects/nsfw misses at threshold 0 and widen_max_labels
    widen_max_labels: int = 100
    audit_rate: float = 0.01  # share of derived answers also asked upstream and compared

    @property
    def ttl_s(self) -> float:
        return self.ttl_days * 86400.0

    @property
    def keep_s(self) -> float:
        """How long an entry is kept: fresh for ttl, then servable if the upstream fails."""
        return (self.ttl_days + self.stale_if_error_days) * 86400.0


@dataclass(frozen=True)
class QuotaConfig:
    period: str = "month"


@dataclass(frozen=True)
class AdminConfig:
    token_env: str | None = None  # the admin API is off unless this names a set var
    token: Secret = field(default_factory=lambda: Secret(""), repr=False)
    status_token_env: str | None = None  # a read-only token: /status and /status.json only
    status_token: Secret = field(default_factory=lambda: Secret(""), repr=False)
    public_status: bool = False  # /status for anyone, without a token

    @property
    def enabled(self) -> bool:
        return bool(self.token)


@dataclass(frozen=True)
class PricingConfig:
    """What one upstream call costs, for spend and savings in money (``gateway.core.usage``)."""

    per_call: float = 0.0
    currency: str = "USD"
    types: tuple[tuple[str, float], ...] = ()  # per-type prices; other types cost per_call

    def price(self, type_: str) -> float:
        return next((p for t, p in self.types if t == type_), self.per_call)


@dataclass(frozen=True)
class NotifyConfig:
    """Webhooks told when a team crosses a share of its quota, the breaker opens or closes,
    or the ledger drifts from the upstream's count (``gateway.http.notify``)."""

    webhook_urls: tuple[str, ...] = field(default=(), repr=False)  # may hold a token (Slack)
    slack: bool = False  # a Slack-compatible body ({"text": ...}) instead of the event's JSON
    quota_shares: tuple[float, ...] = (0.8, 1.0)
    drift_calls: int = 10  # |gateway_ledger_drift_calls| above this is notified
    timeout_s: float = 5.0  # one POST
    retries: int = 3  # after the first POST, with backoff
    max_queue: int = 100  # events waiting to be sent; past it the newest are dropped

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_urls)


@dataclass(frozen=True)
class TeamConfig:
    name: str
    key_hashes: frozenset[str]
    quota: int
    rate_per_s: float | None = None
    burst: int | None = None
    types: frozenset[str] | None = None
    allow_refresh: bool = True  # false: this team's Cache-Control no-cache is a plain lookup


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    storage: StorageConfig = StorageConfig()
    cache: CacheConfig = CacheConfig()
    quota: QuotaConfig = QuotaConfig()
    admin: AdminConfig = AdminConfig()
    teams: tuple[TeamConfig, ...] = ()
    source: str = "<built-in>"
    pricing: PricingConfig = PricingConfig()
    notify: NotifyConfig = NotifyConfig()

    def team(self, name: str) -> TeamConfig | None:
        return next((t for t in self.teams if t.name == name), None)


class LiveConfig:
    """The config in force, held once: every part that follows a reload (the handlers, the
    quota ledger, the recognition service) reads ``current`` here, and a reload replaces it in
    one assignment, so no part can run on a config the others have left."""

    __slots__ = ("current",)

    def __init__(self, config: Config):
        self.current = config


def live(config: Config | LiveConfig) -> LiveConfig:
    return config if isinstance(config, LiveConfig) else LiveConfig(config)


def restart_only(cls: type) -> tuple[str, ...]:
    """The keys of a section that a reload cannot apply (marked ``_RESTART`` on the field)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("restart"))


def _keys(
    cls: type, *, without: frozenset[str] = frozenset(), extra: frozenset[str] = frozenset()
) -> set[str]:
    """A table's known keys: its dataclass's fields (written once there), less the fields that
    are not keys of the file (a secret read from the environment), plus keys that are."""
    return {f.name for f in dataclasses.fields(cls)} - without | extra


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default, as its dataclass writes it (the one place a default is written)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


_OWN = object()  # "the dataclass's default for this key"


class _Reader:
    """Typed access to one TOML table, with errors that name file and key.

    Built on a section's dataclass, it knows the table's keys and each key's default from the
    dataclass's fields, so neither is written again here. A problem is noted in ``problems``
    (shared by every table of one file) and reading goes on with the key's default, so one run
    of ``check-config`` reports them all; ``parse_config`` raises them together at the end."""

    def __init__(
        self,
        problems: list[str],
        source: str,
        prefix: str,
        table: Mapping[str, Any],
        section: type | set[str],
        *,
        without: frozenset[str] = frozenset(),
        extra: frozenset[str] = frozenset(),
    ):
        self.problems, self.source, self.prefix, self.table = problems, source, prefix, table
        if isinstance(section, set):
            known, self.defaults = section, {}
        else:
            known, self.defaults = _keys(section, without=without, extra=extra), _defaults(section)
        for key in table:
            if key not in known:
                self.fail(key, f"unknown key (known: {', '.join(sorted(known))})")

    def fail(self, key: str, problem: str) -> None:
        self.problems.append(f"{self.source}: {self.prefix}{key}: {problem}")

    def _default(self, key: str, default: Any) -> Any:
        return self.defaults[key] if default is _OWN else default

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _OWN) -> Any:
        default = self._default(key, default)
        if key not in self.table:
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(key, f"must be {_kind_name(kind)}, got a boolean")
            return default
        if not isinstance(value, kind):
            self.fail(key, f"must be {_kind_name(kind)}, got {type(value).__name__}")
            return default
        return value

    def number(
        self, key: str, default: Any = _OWN, *, minimum: float = 0.0, strict: bool = True
    ) -> float:
        fallback = float(self._default(key, default))
        value = float(self.get(key, (int, float), fallback))
        if value < minimum or (strict and value == minimum):
            self.fail(key, f"must be {'>' if strict else '>='} {minimum:g}")
            return fallback
        return value

    def integer(self, key: str, default: Any = _OWN, *, minimum: int = 1) -> int:
        fallback = int(self._default(key, default))
        value: int = self.get(key, int, fallback)
        if value < minimum:
            self.fail(key, f"must be an integer >= {minimum}")
            return fallback
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        default: tuple[str, ...] = tuple(self.defaults.get(key, ()))
        value = self.get(key, list, list(default))
        if not all(isinstance(v, str) and v for v in value):
            self.fail(key, "must be a list of non-empty strings")
            return default
        return tuple(value)


_ORIGIN = re.compile(r"https?://[^/\s:]+(:\d{1,5})?")


def _origins(table: _Reader, origins: tuple[str, ...]) -> tuple[str, ...]:
    """An origin is what a browser sends in Origin: scheme://host[:port], no path; "*" any."""
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            table.fail(
                "cors_origins",
                f'{origin!r} is not an origin (scheme://host[:port], no path, or "*")',
            )
    return origins


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    require_api_key: bool = True,
) -> Config:
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_config(
        raw, source=source, env=os.environ if env is None else env, require_api_key=require_api_key
    )


def parse_config(
    raw: Mapping[str, Any],
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    require_api_key: bool = True,
) -> Config:
    env = os.environ if env is None else env
    problems: list[str] = []
    top = _Reader(
        problems,
        source,
        "",
        raw,
        {"server", "upstream", "storage", "cache", "quota", "admin", "teams", "pricing", "notify"},
    )

    def table(name: str) -> Mapping[str, Any]:
        value = top.get(name, dict, {})
        return value  # type: ignore[no-any-return]

    s = _Reader(
        problems,
        source,
        "server.",
        table("server"),
        ServerConfig,
    )
    port = s.integer("port", minimum=0)
    if port > 65535:
        s.fail("port", "must be <= 65535")
    buffer_kb = s.integer("access_log_buffer_kb")
    if buffer_kb > 65536:
        s.fail("access_log_buffer_kb", "must be <= 65536 (64 MB)")
    flush_ms = s.integer("access_log_flush_ms")
    if flush_ms > 60000:
        s.fail("access_log_flush_ms", "must be <= 60000 (a killed process loses up to this)")
    event_loop: str = s.get("event_loop", str)
    if event_loop not in EVENT_LOOPS:
        s.fail("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, not {event_loop!r}")
    if event_loop == "uvloop" and not uvloop_installed():
        s.fail("event_loop", 'uvloop is not installed (pip install uvloop), or use "auto"')
    server = ServerConfig(
        host=s.get("host", str),
        port=port,
        workers=s.integer("workers"),
        cors_origins=_origins(s, s.strings("cors_origins")),
        max_inflight=s.integer("max_inflight"),
        drain_timeout_s=s.number("drain_timeout_s"),
        drain_grace_s=s.number("drain_grace_s", strict=False),
        access_log=s.get("access_log", bool),
        access_log_buffer_kb=buffer_kb,
        access_log_flush_ms=flush_ms,
        event_loop=event_loop,
        body_timeout_s=s.number("body_timeout_s"),
        max_receiving=s.integer("max_receiving"),
        body_idle_timeout_s=s.number("body_idle_timeout_s"),
        body_min_rate=s.integer("body_min_rate", minimum=0),
        keepalive_timeout_s=s.number("keepalive_timeout_s"),
    )

    u = _Reader(
        problems,
        source,
        "upstream.",
        table("upstream"),
        UpstreamConfig,
        without=frozenset({"api_key"}),
    )
    url: str = u.get("url", str)
    if not url.startswith(("http://", "https://")):
        u.fail("url", "must be an http:// or https:// URL")
    key_env: str = u.get("api_key_env", str)
    if not key_env.strip() or "=" in key_env or "\0" in key_env:
        u.fail("api_key_env", "must name an environment variable")
    key_file: str = u.get("api_key_file", str)
    unread = len(problems)
    if key_file:
        # A missing secret file is refused only where the key is needed: check-config runs
        # where the container's /run/secrets is not mounted.
        api_key = (
            _noted(problems, file_secret, key_file, source=source, key="upstream.api_key_file")
            if require_api_key or Path(key_file).exists()
            else ""
        )
        if require_api_key and not api_key and len(problems) == unread:
            u.fail("api_key_file", f"{key_file} is empty")
    else:
        api_key = _noted(
            problems, env_or_file_secret, env, key_env, source=source, key="upstream.api_key_env"
        )
    if require_api_key and not api_key and not key_file and len(problems) == unread:
        u.fail(
            "api_key_env",
            f"environment variable {key_env} is not set (the upstream key comes from the "
            "environment or upstream.api_key_file, never the config file)",
        )
    upstream = UpstreamConfig(
        url=url,
        api_key_env=key_env,
        timeout_s=u.number("timeout_s"),
        max_concurrency=u.integer("max_concurrency"),
        max_queue=u.integer("max_queue"),
        retries=u.integer("retries", minimum=0),
        breaker_failures=u.integer("breaker_failures"),
        breaker_cooldown_s=u.number("breaker_cooldown_s"),
        max_answer_kb=u.integer("max_answer_kb"),
        api_key_file=key_file,
        api_key=Secret(api_key),
    )

    st = _Reader(
        problems,
        source,
        "storage.",
        table("storage"),
        StorageConfig,
    )
    backend: str = st.get("backend", str)
    if backend not in ("sqlite", "redis"):
        st.fail("backend", 'must be "sqlite" or "redis"')
    storage = StorageConfig(
        backend=backend,
        path=st.get("path", str),
        cache_path=st.get("cache_path", str),
        synchronous=st.get("synchronous", str).lower(),
        busy_timeout_ms=st.integer("busy_timeout_ms", minimum=0),
        redis_url=st.get("redis_url", str),
        redis_prefix=st.get("redis_prefix", str),
        redis_max_connections=st.integer("redis_max_connections", minimum=0),
        require_persistence=st.get("require_persistence", bool),
        redis_sentinels=st.strings("redis_sentinels"),
        redis_master_name=st.get("redis_master_name", str),
        redis_min_replicas_ack=st.integer("redis_min_replicas_ack", minimum=-1),
    )
    for address in storage.redis_sentinels:
        sentinel_host, _, sentinel_port = address.rpartition(":")
        if not sentinel_host or not sentinel_port.isdigit():
            st.fail("redis_sentinels", f'each must be "host:port", not {address!r}')
    if storage.synchronous not in ("normal", "full"):
        st.fail("synchronous", 'must be "normal" or "full"')
    if backend == "redis" and not storage.redis_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        st.fail("redis_url", "must be a redis:// URL")

    c = _Reader(
        problems,
        source,
        "cache.",
        table("cache"),
        CacheConfig,
    )
    cache = CacheConfig(
        ttl_days=c.number("ttl_days"),
        max_mb=c.number("max_mb"),
        share_across_teams=c.get("share_across_teams", bool),
        coalesce_wait_s=c.number("coalesce_wait_s"),
        coalesce_lock_s=c.number("coalesce_lock_s"),
        stale_if_error_days=c.number("stale_if_error_days", strict=False),
        memory_mb=c.number("memory_mb", strict=False),
        derive=c.get("derive", bool),
        widen=c.get("widen", bool),
        widen_max_labels=c.integer("widen_max_labels"),
        audit_rate=c.number("audit_rate", strict=False),
    )
    if not 0.0 <= cache.audit_rate <= 1.0:
        c.fail("audit_rate", "must be between 0 and 1 (a share of derived answers)")
    if cache.widen and not cache.derive:
        c.fail("widen", "needs derive = true (a widened miss's answer is derived)")

    q = _Reader(problems, source, "quota.", table("quota"), QuotaConfig)
    period: str = q.get("period", str)
    if period not in PERIODS:
        q.fail("period", f"must be one of {', '.join(PERIODS)}")

    a = _Reader(
        problems,
        source,
        "admin.",
        table("admin"),
        AdminConfig,
        without=frozenset({"token", "status_token"}),
    )
    token_env: str | None = a.get("token_env", str)
    status_env: str | None = a.get("status_token_env", str)
    admin = AdminConfig(
        token_env=token_env,
        token=Secret(
            _noted(
                problems, env_or_file_secret, env, token_env, source=source, key="admin.token_env"
            )
            if token_env
            else ""
        ),
        status_token_env=status_env,
        status_token=Secret(
            _noted(
                problems,
                env_or_file_secret,
                env,
                status_env,
                source=source,
                key="admin.status_token_env",
            )
            if status_env
            else ""
        ),
        public_status=a.get("public_status", bool),
    )
    if admin.token and admin.token == admin.status_token:
        a.fail("status_token_env", "the viewer token must differ from the admin token")

    teams = _parse_teams(problems, source, table("teams"), upstream.api_key)
    pricing = _parse_pricing(problems, source, table("pricing"))
    notify = _parse_notify(problems, source, table("notify"))
    if problems:
        raise ConfigError("\n".join(problems))
    return Config(
        server=server,
        upstream=upstream,
        storage=storage,
        cache=cache,
        quota=QuotaConfig(period=period),
        admin=admin,
        teams=teams,
        source=source,
        pricing=pricing,
        notify=notify,
    )


_CURRENCY = re.compile(r"[A-Z]{3}")
_WEBHOOK = re.compile(r"https?://[^/\s]+(/\S*)?")


def _parse_pricing(problems: list[str], source: str, raw: Mapping[str, Any]) -> PricingConfig:
    p = _Reader(problems, source, "pricing.", raw, PricingConfig)
    currency: str = p.get("currency", str)
    if not _CURRENCY.fullmatch(currency):
        p.fail("currency", f"must be a three-letter ISO 4217 code such as USD, got {currency!r}")
    types: list[tuple[str, float]] = []
    t = _Reader(problems, source, "pricing.types.", p.get("types", dict, {}), set(ANALYSIS_TYPES))
    for name in t.table:
        if name in ANALYSIS_TYPES:
            types.append((name, t.number(name, 0.0, strict=False)))
    return PricingConfig(
        per_call=p.number("per_call", strict=False), currency=currency, types=tuple(types)
    )


def _parse_notify(problems: list[str], source: str, raw: Mapping[str, Any]) -> NotifyConfig:
    n = _Reader(
        problems,
        source,
        "notify.",
        raw,
        NotifyConfig,
    )
    urls = n.strings("webhook_urls")
    for url in urls:
        if not _WEBHOOK.fullmatch(url):
            n.fail("webhook_urls", "each must be an http:// or https:// URL")
            break
    shares = n.get("quota_shares", list, list(n.defaults["quota_shares"]))
    if not all(
        isinstance(x, int | float) and not isinstance(x, bool) and 0 < x <= 1 for x in shares
    ):
        n.fail(
            "quota_shares", "must be a list of shares of the quota, each > 0 and <= 1 (0.8 = 80%)"
        )
        shares = list(n.defaults["quota_shares"])
    return NotifyConfig(
        webhook_urls=urls,
        slack=n.get("slack", bool),
        quota_shares=tuple(sorted({float(x) for x in shares})),
        drift_calls=n.integer("drift_calls"),
        timeout_s=n.number("timeout_s"),
        retries=n.integer("retries", minimum=0),
        max_queue=n.integer("max_queue"),
    )


def _noted(problems: list[str], read: Callable[..., str], *args: Any, **kwargs: Any) -> str:
    """A secret read by ``read``; "" once its ConfigError is noted in ``problems``."""
    try:
        return read(*args, **kwargs)
    except ConfigError as exc:
        problems.append(str(exc))
        return ""


def _parse_teams(
    problems: list[str], source: str, raw: Mapping[str, Any], upstream_key: Secret
) -> tuple[TeamConfig, ...]:
    teams: list[TeamConfig] = []
    owner: dict[str, str] = {}
    upstream_hash = hash_key(upstream_key.reveal()) if upstream_key else None
    for name, body in raw.items():
        prefix = f"teams.{name}."
        if not isinstance(body, dict):
            problems.append(f"{source}: teams.{name}: must be a table")
            continue
        if not name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"{source}: teams.{name}: team names use letters, digits, - and _")
        if name.lower() in RESERVED_TEAM_NAMES:
            problems.append(
                f"{source}: teams.{name}: the name is reserved (metrics and logs label "
                'requests without a valid key as team "unknown"); choose another'
            )
        if name.lower() == AUDIT_TEAM:
            problems.append(
                f"{source}: teams.{name}: the name is reserved (the gateway charges its own "
                'cache audits to a ledger line called "audit"); choose another'
            )
        t = _Reader(
            problems,
            source,
            prefix,
            body,
            TeamConfig,
            without=frozenset({"name", "key_hashes"}),
            extra=frozenset({"keys"}),
        )
        if "keys" not in body:
            t.fail("keys", "missing (a list of team keys, plain or sha256:<hex>)")
        if "quota" not in body:
            t.fail("quota", "missing (upstream calls per quota.period)")
        hashes: set[str] = set()
        listed = t.strings("keys")
        for key in listed:
            h = _key_hash(key)
            if h is None:
                t.fail("keys", "a sha256: key must be 64 hex digits")
                continue
            if h == upstream_hash:
                t.fail("keys", "the upstream key must never be a team key")
            if h in owner and owner[h] != name:
                t.fail("keys", f"a key is also listed for team {owner[h]!r}")
            owner[h] = name
            hashes.add(h)
        if body.get("keys") == []:
            t.fail("keys", "must list at least one key")
        rate = t.get("rate_per_s", (int, float), None)
        if rate is not None and rate <= 0:
            t.fail("rate_per_s", "must be > 0")
        burst = t.get("burst", int)
        if burst is not None and burst < 1:
            t.fail("burst", "must be an integer >= 1")
        types = t.get("types", list, None)
        if types is not None and not all(x in ANALYSIS_TYPES for x in types):
            t.fail("types", f"must list only {', '.join(ANALYSIS_TYPES)}")
        teams.append(
            TeamConfig(
                name=name,
                key_hashes=frozenset(hashes),
                quota=t.integer("quota", 0, minimum=0),  # required: a missing one is noted above
                rate_per_s=float(rate) if rate is not None else None,
                burst=burst,
                types=frozenset(types) if types is not None else None,
                allow_refresh=t.get("allow_refresh", bool),
            )
        )
    if not raw:
        # Every request would be a 401: a config mistake, not a way to run.
        problems.append(
            f"{source}: teams: no team is configured (add a [teams.NAME] table; the "
            "container image's config has none on purpose: mount a config with your teams "
            "over it)"
        )
    return tuple(teams)


def _key_hash(key: str) -> str | None:
    if key.startswith("sha256:"):
        hexpart = key[7:].lower()
        if len(hexpart) != 64 or any(ch not in "0123456789abcdef" for ch in hexpart):
            return None
        return "sha256:" + hexpart
    return hash_key(key)
