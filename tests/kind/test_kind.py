"""End to end on a real cluster: build the image, load it into kind, install the chart, apply a
Workflow, and watch ``kubectl get dwf`` reach Succeeded.

Opt-in (``DAGSMITH_E2E_KIND=1``) and only with local tools: ``docker`` (with a running daemon),
``kind``, ``kubectl`` and ``helm`` on PATH. pytest-kind is given those binaries, so it downloads
nothing. The demo Postgres and RabbitMQ images are pulled by the cluster (or loaded from the local
Docker cache when present). ``DAGSMITH_KIND_KEEP=1`` keeps the cluster for a look afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "dagsmith:kind-e2e"
DEMO_IMAGES = ("postgres:15", "rabbitmq:3.13-management")
TOOLS = ("docker", "kind", "kubectl", "helm")


def skip_reason() -> str | None:
    if os.environ.get("DAGSMITH_E2E_KIND") != "1":
        return "opt-in: set DAGSMITH_E2E_KIND=1 (needs docker, kind, kubectl and helm on PATH)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"not on PATH: {', '.join(missing)}"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "the Docker daemon is not reachable (docker info failed)"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]
REASON = skip_reason()
if REASON:
    pytestmark.append(pytest.mark.skip(reason=REASON))


def run(*args: str, timeout: float = 900) -> str:
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    from pytest_kind import KindCluster

    dockerfile = ROOT / "Dockerfile" if (ROOT / "Dockerfile").exists() else ROOT / "tests" / "kind" / "Dockerfile"
    run("docker", "build", "-t", IMAGE, "-f", str(dockerfile), str(ROOT))
    kind = KindCluster(
        f"dagsmith-{uuid.uuid4().hex[:6]}",
        kind_path=Path(shutil.which("kind") or "kind"),
        kubectl_path=Path(shutil.which("kubectl") or "kubectl"),
    )
    kind.create()
    try:
        kind.load_docker_image(IMAGE)
        for image in DEMO_IMAGES:  # from the local cache when there is one; else the node pulls it
            if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
                kind.load_docker_image(image)
        yield kind
    finally:
        if os.environ.get("DAGSMITH_KIND_KEEP") != "1":
            kind.delete()


def has_trainer() -> bool:
    # --entrypoint: the root Dockerfile's entrypoint is already `dagsmith`, the fallback's is empty.
    probe = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "dagsmith", IMAGE, "trainer", "--help"],
        capture_output=True,
        timeout=120,
    )
    return probe.returncode == 0


def test_a_workflow_applied_with_kubectl_succeeds(cluster: object) -> None:
    kubeconfig = str(cluster.kubeconfig_path)  # type: ignore[attr-defined]

    def kubectl(*args: str) -> str:
        return run("kubectl", "--kubeconfig", kubeconfig, *args, timeout=120)

    run(
        "helm", "install", "dagsmith", str(ROOT / "charts" / "dagsmith"),
        "--kubeconfig", kubeconfig, "--namespace", "dagsmith", "--create-namespace",
        "--values", str(ROOT / "charts" / "dagsmith" / "ci" / "demo-values.yaml"),
        "--set", "operator.allNamespaces=true", "--set", "operator.namespaces=null",
        "--set", f"image.repository={IMAGE.split(':')[0]}", "--set", f"image.tag={IMAGE.split(':')[1]}",
        "--set", "image.pullPolicy=Never",
        "--set", f"trainer.enabled={'true' if has_trainer() else 'false'}",
        "--wait", "--timeout", "10m",
    )  # fmt: skip
    kubectl("apply", "--namespace", "default", "-f", str(ROOT / "examples" / "hello.yaml"))

    def phase() -> str:
        return kubectl("get", "dwf", "hello", "--namespace", "default", "-o", "jsonpath={.status.phase}")

    wait_until(lambda: phase() == "Succeeded", timeout=300, what="kubectl get dwf hello: Succeeded", interval=2)
    table = kubectl("get", "dwf", "--namespace", "default")
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "PROGRESS", "SURGERIES", "REWARD", "AGE"]
    assert "Succeeded" in table and "2/2" in table
    assert "MESSAGE" in kubectl("get", "dwf", "--namespace", "default", "-o", "wide").split("\n")[0]
    workflow_id = kubectl("get", "dwf", "hello", "--namespace", "default", "-o", "jsonpath={.status.workflowId}")
    assert workflow_id
