"""What the running application holds: one typed object under one ``web.AppKey``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import Config, LiveConfig, ServerConfig, TeamConfig, restart_only
from gateway.core.keys import KeyRing
from gateway.core.quota import QuotaLedger
from gateway.core.ratelimit import RateLimiter
from gateway.core.service import RecognitionService
from gateway.http.deadlines import Deadlines
from gateway.http.form import UploadMemory
from gateway.obs.metrics import Metrics
from gateway.store.base import Store
from gateway.upstream import UpstreamClient

# Marked on ServerConfig's fields: read once at start, so a reload only reports them.
RESTART_ONLY_SERVER_KEYS = restart_only(ServerConfig)


@dataclass(eq=False)
class GatewayState:
    live: LiveConfig
    store: Store
    metrics: Metrics
    ledger: QuotaLedger
    upstream: UpstreamClient
    service: RecognitionService
    spool_dir: str | None = None
    teams_by_key_hash: dict[str, TeamConfig] = field(default_factory=dict)
    teams_by_key: dict[str, TeamConfig] = field(default_factory=dict)  # accepted raw keys
    limiter: RateLimiter = field(default_factory=RateLimiter)
    deadlines: Deadlines = field(default_factory=Deadlines)
    upload_memory: UploadMemory = field(default_factory=UploadMemory)  # bodies read whole
    inflight: int = 0  # requests whose body is in, not yet answered
    receiving: int = 0  # requests whose body is still arriving
    draining: bool = False

    def __post_init__(self) -> None:
        self.teams_by_key_hash = {h: t for t in self.config.teams for h in t.key_hashes}
        # Keys issued through the store (gateway.core.keys), after the config's in _authorize.
        self.keyring = KeyRing(self.store, self.ledger.clock)
        # What the process was started with: the socket, the store and the upstream client
        # keep it whatever later reloads say.
        self.started = self.config

    @property
    def config(self) -> Config:
        return self.live.current

    def apply_config(self, new: Config) -> list[str]:
        """Swap in a re-read config: team keys, quotas, rate limits, types and cache rules
        change at once, without dropping a request. Returns the changed keys that only a
        restart applies."""
        started = self.started
        needs_restart = [
            f"server.{name}"
            for name in RESTART_ONLY_SERVER_KEYS
            if getattr(started.server, name) != getattr(new.server, name)
        ]
        needs_restart += [
            section
            for section, a, b in (
                ("storage", started.storage, new.storage),
                ("upstream", started.upstream, new.upstream),
            )
            if a != b
        ]
        self.live.current = new  # the ledger and the service read the same object
        self.teams_by_key_hash = {h: t for t in new.teams for h in t.key_hashes}
        self.teams_by_key = {}
        self.metrics.preinitialize(new)  # a removed team's quota gauges go with it
        return needs_restart


STATE: web.AppKey[GatewayState] = web.AppKey("gateway_state", GatewayState)
