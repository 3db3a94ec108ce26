"""``gateway serve``: load the config, refuse a port or store still held, then run one serving
process (``gateway.ops.server.run_worker``) or, with ``server.workers > 1``, a supervisor
(``gateway.ops.supervisor``) and its workers. Above both, so neither imports the other back."""

from __future__ import annotations

from gateway.config import load_config
from gateway.obs.logs import setup_logging
from gateway.ops.server import Options, refuse_if_occupied, run_worker
from gateway.ops.supervisor import supervise


def serve(
    config_path: str,
    *,
    host: str | None = None,
    port: int | None = None,
    log_format: str = "text",
    log_level: str = "INFO",
) -> int:
    config = load_config(config_path)
    setup_logging(log_format, log_level)
    options = Options(
        config_path,
        host or config.server.host,
        config.server.port if port is None else port,
        log_format,
        log_level,
    )
    refuse_if_occupied(config, options)
    if config.server.workers > 1:
        return supervise(options, config)
    run_worker(options, reuse_port=False)
    return 0
