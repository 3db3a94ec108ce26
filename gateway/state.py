"""What the running application holds: one typed object under one ``web.AppKey``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import Config, TeamConfig
from gateway.metrics import Metrics
from gateway.quota import QuotaLedger
from gateway.service import RecognitionService
from gateway.store.base import Store
from gateway.upstream import UpstreamClient


@dataclass(eq=False)
class GatewayState:
    config: Config
    store: Store
    metrics: Metrics
    ledger: QuotaLedger
    upstream: UpstreamClient
    service: RecognitionService
    spool_dir: str | None = None
    teams_by_key_hash: dict[str, TeamConfig] = field(default_factory=dict)
    inflight: int = 0
    draining: bool = False

    def __post_init__(self) -> None:
        self.teams_by_key_hash = {h: t for t in self.config.teams for h in t.key_hashes}


STATE: web.AppKey[GatewayState] = web.AppKey("gateway_state", GatewayState)
