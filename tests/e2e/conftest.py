from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dagsmith.client import Client
from dagsmith.settings import Settings
from tests.support.stack import Stack
from tests.support.wait import wait_until

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="session")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API, controller, evaluator and one executor (all built-in types), as processes."""
    s = Stack(settings, tmp_path_factory.mktemp("logs"))
    try:
        s.start_core()
        yield s
    finally:
        s.stop_all()


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with stack.client() as c:
        yield c


def auth(stack: Stack) -> dict[str, str]:
    """Headers that authenticate as the stack's admin."""
    return {"Authorization": f"Bearer {stack.token}"} if stack.token else {}


def pg(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(settings.psycopg_dsn(), autocommit=True)


def wait_finished(client: Client, workflow_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(
        lambda: (w := client.workflow(workflow_id))["status"] in TERMINAL and w,
        timeout=timeout,
        what=f"workflow {workflow_id} to finish",
    )


def workflow(name: str, *tasks: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"tasks": list(tasks), **spec},
    }


def submit(client: Client, doc: dict[str, Any], **kw: Any) -> str:
    import orjson

    return str(client.submit(orjson.dumps(doc), content_type="application/json", **kw)["id"])


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
