"""Running the operator: kopf's settings, peering, liveness, and a clean shutdown.

Several replicas may run: kopf's peering (a ``ClusterKopfPeering`` when serving all namespaces, a
``KopfPeering`` per namespace otherwise, created by the Helm chart) keeps exactly one active, the
one with the highest priority. The default priority favours the replica that started first, so a
rolling update does not hand over until the old pod has exited (it then leaves the peering at
once, and the new one resumes).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf
import orjson

from controller.db import create_engine
from controller.operator.handlers import OperatorContext, build_registry
from controller.operator.mirror import StoreMirror
from dagsmith.settings import Settings

FINALIZER = "dagsmith.io/cancel-on-delete"


class SpecDigestStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf keeps what it last handled of each object in an annotation, to tell what changed. Its
    own essence is the whole spec plus every label and annotation of the object: a Workflow of a
    few thousand tasks, or one carrying large annotations of its own, puts that annotation over
    the API server's limit on annotations (256 KiB in all), and every later patch of the object —
    its status, the removal of its finalizer — is refused. So only what the update handler
    watches is kept, the spec, and as a digest with ``spec.cancel`` as it is: a changed digest is
    all that handler needs, since it compares the spec with the store's copy, not with kopf's.
    Labels and annotations are left out: no handler reacts to them."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        spec = body.get("spec")
        if not isinstance(spec, Mapping):
            return {}
        rest = {k: v for k, v in spec.items() if k != "cancel"}
        digest: dict[str, Any] = {"sha256": hashlib.sha256(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)).hexdigest()}
        if "cancel" in spec:
            digest["cancel"] = spec["cancel"]
        return {"spec": digest}


def started_priority(now: float | None = None) -> int:
    """A peering priority that is higher for replicas started earlier (millisecond resolution)."""
    return 10**13 - int((time.time() if now is None else now) * 1000)


@dataclass(frozen=True)
class OperatorOptions:
    namespaces: Sequence[str] = ()  # empty: every namespace
    peering: str = "dagsmith"
    standalone: bool = False
    priority: int | None = None  # None: started_priority()
    liveness: str | None = None  # e.g. http://0.0.0.0:8080/healthz
    status_interval: float = 2.0  # seconds between status refreshes
    identity: str | None = None  # peer name; kopf uses POD_ID or user@host otherwise

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def kopf_settings(options: OperatorOptions) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Our own names on the objects instead of kopf's defaults; nothing under .status but ours.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="dagsmith.io")
    settings.persistence.diffbase_storage = SpecDigestStorage(prefix="dagsmith.io", key="last-handled-configuration")
    settings.posting.reporting_component = "dagsmith-operator"
    settings.posting.reporting_instance = options.identity or os.environ.get("POD_ID") or socket.gethostname()
    settings.posting.event_name_prefix = "dagsmith-"
    settings.peering.lifetime = 30
    # Reconnect watches regularly: a stream a proxy silently dropped is noticed within a minute.
    settings.watching.server_timeout = 50
    settings.watching.client_timeout = 60
    return settings


async def run_operator(
    settings: Settings,
    options: OperatorOptions,
    *,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """Run until ``stop_flag`` is set (or SIGINT/SIGTERM when in the main thread)."""
    engine = create_engine(
        settings.database_url.get_secret_value(), pool_size=min(settings.db_pool_size, 4), name="operator"
    )
    ctx = OperatorContext(settings=settings, engine=engine, mirror=StoreMirror(engine, options.status_interval))
    try:
        await kopf.operator(
            registry=build_registry(options.status_interval),
            settings=kopf_settings(options),
            clusterwide=options.clusterwide,
            namespaces=list(options.namespaces),
            standalone=options.standalone,
            peering_name=None if options.standalone else options.peering,
            priority=options.priority if options.priority is not None else started_priority(),
            liveness_endpoint=options.liveness,
            identity=options.identity,  # type: ignore[arg-type]
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            memo=kopf.Memo(ctx=ctx),
        )
    finally:
        await engine.dispose()
