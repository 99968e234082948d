"""Serving /metrics: one helper for every service, so they all treat a taken port the same way."""

from __future__ import annotations

import structlog
from prometheus_client import start_http_server

log = structlog.get_logger(__name__)


def serve_metrics(setting: int, default: int, service: str, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on ``host``, port ``setting`` (0: the service's ``default`` port; negative:
    not at all).

    A taken port is not fatal: a second process of the same service on one host (two controllers,
    several executors) runs without /metrics and says so, instead of failing to start. Returns
    the port served, or None.
    """
    port = setting or default
    if port <= 0:
        return None
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning(
            "metrics port in use: this process serves no /metrics (set DAGSMITH_METRICS_PORT to give it its own)",
            service=service,
            port=port,
            error=str(exc),
        )
        return None
    return port
