"""Delete every queue and exchange a test session created (they all share its prefix)."""

from __future__ import annotations

import asyncio
import contextlib

from dagsmith.amqp import delete_topology

EXTRA_TYPES = ["test.unknown", "test.nobody", "test.slow", "test.echo"]


def delete_prefix(url: str, prefix: str) -> None:
    import executors.builtins  # noqa: F401  (registers the built-in types whose queues we delete)
    from executors.registry import registry

    with contextlib.suppress(Exception):
        asyncio.run(delete_topology(url, prefix, [*registry.types(), *EXTRA_TYPES]))
