"""A real kopf operator against an emulated Kubernetes API, with the real engine behind it.

- the Kubernetes API: kmock's emulator (:mod:`tests.support.kube`) serving the chart's CRDs, in
  its own thread, reached through a kubeconfig;
- the operator: :func:`controller.operator.run_operator` in its own thread and event loop (kopf
  cancels every task of its loop when it stops);
- the engine: controller, evaluator and executor processes on the real Postgres and RabbitMQ, with
  a database and queue prefix of their own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.operator import OperatorOptions, run_operator
from dagsmith.settings import Settings
from tests.conftest import AMQP, create_database, drop_database, make_settings
from tests.support.kube import KubeServer
from tests.support.stack import ROOT, Stack, free_port
from tests.support.wait import wait_until

NAMESPACES = ("default", "team-a")
PEERING = "dagsmith"


@pytest.fixture(scope="module")
def engine_settings() -> Iterator[Settings]:
    from controller.migrate import upgrade
    from tests.support.amqp_cleanup import delete_prefix

    name = f"dagsmith_test_op_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    prefix = f"top{uuid.uuid4().hex[:8]}"
    yield make_settings(url, prefix)
    delete_prefix(AMQP, prefix)
    drop_database(name)


@pytest.fixture(scope="module")
def engine(engine_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Controller, evaluator and one executor as processes (no API: the operator is the front door)."""
    stack = Stack(engine_settings, tmp_path_factory.mktemp("engine-logs"))
    try:
        stack.start("controller", "controller")
        stack.start("evaluator", "evaluator")
        stack.start_executor()
        yield stack
    finally:
        stack.stop_all()


def chart_crds() -> list[dict[str, Any]]:
    crds: list[dict[str, Any]] = []
    for path in sorted((ROOT / "charts" / "dagsmith" / "crds").glob("*.yaml")):
        crds += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return crds


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeServer]:
    server = KubeServer(tmp_path_factory.mktemp("kube"), chart_crds(), NAMESPACES)
    for ns in NAMESPACES:  # what the chart installs for an operator serving these namespaces
        server.put(
            "kopf.dev/v1/kopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING, "namespace": ns}},
        )
    # ... and for one serving every namespace (--all-namespaces)
    server.put(
        "kopf.dev/v1/clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}},
    )
    server.start()
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(server.kubeconfig)  # the operator logs in with it
    try:
        yield server
    finally:
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
        server.stop()


class OperatorThread:
    """One operator replica: kopf on its own event loop in a thread, stopped by a flag."""

    def __init__(self, settings: Settings, options: OperatorOptions) -> None:
        self.settings = settings
        self.options = options
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"operator-{options.identity}", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(run_operator(self.settings, self.options, stop_flag=self.stop_flag, ready_flag=self.ready_flag))
        except BaseException as exc:
            self.error = exc

    def start(self) -> OperatorThread:
        self.thread.start()
        wait_until(lambda: self.ready_flag.is_set() or self.error, timeout=30, what="the operator to start")
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the operator did not stop within 30s"

    @property
    def liveness(self) -> str:
        assert self.options.liveness
        return self.options.liveness


def replica(
    settings: Settings, identity: str, priority: int, namespaces: tuple[str, ...] = NAMESPACES
) -> OperatorThread:
    """An operator replica serving ``namespaces`` (empty: every namespace, as --all-namespaces)."""
    options = OperatorOptions(
        namespaces=namespaces,
        peering=PEERING,
        priority=priority,
        identity=identity,
        liveness=f"http://127.0.0.1:{free_port()}/healthz",
        status_interval=0.3,
    )
    return OperatorThread(settings, options)


@pytest.fixture(scope="module")
def operator(kube: KubeServer, engine: Stack, engine_settings: Settings) -> Iterator[OperatorThread]:
    op = replica(engine_settings, "replica-a", priority=200).start()
    try:
        yield op
    finally:
        if op.thread.is_alive():
            op.stop()


@pytest.fixture(scope="module")
def k8s(kube: KubeServer) -> Iterator[Any]:
    """The official Kubernetes client, configured from the same kubeconfig."""
    import kubernetes

    client = kubernetes.config.new_client_from_config(str(kube.kubeconfig))
    try:
        yield client
    finally:
        client.close()


EXAMPLES = Path(ROOT) / "examples"
