"""Structured logs: JSON lines when stderr is not a terminal, readable console output when it is.

Code logs through ``structlog.get_logger()``; anything about a task binds ``workflow_id``,
``task_id`` and ``attempt`` so every line can be joined with the API's view.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(service: str, level: str = "INFO", fmt: str = "auto") -> None:
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        # Filter first: a debug line on a hot path must cost nothing when debug is off.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    # Chatty libraries: their INFO lines are noise at our INFO level.
    for name in ("aio_pika", "aiormq", "uvicorn.access", "httpx", "kopf.objects"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def redact(params: dict[str, Any], secrets: list[str]) -> dict[str, Any]:
    """A copy of ``params`` safe to log or show: the values named in ``secrets`` are masked."""
    if not secrets:
        return params
    return {k: ("***" if k in secrets else v) for k, v in params.items()}


def secret_values(params: dict[str, Any], secrets: list[str]) -> list[str]:
    """The texts a secret param holds (4 characters or more; a dict's or list's every leaf, as
    in HTTP headers), longest first so a value containing another is masked whole."""
    found: set[str] = set()
    stack = [params[k] for k in secrets if k in params]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str | int | float) and not isinstance(value, bool) and len(str(value)) >= 4:
            found.add(str(value))
    return sorted(found, key=len, reverse=True)


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` with every occurrence of each secret text replaced by ``***``."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    return value
