"""The operator end to end: kubectl-like calls in, a real engine behind, ``.status`` and Events out."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from dagsmith.settings import Settings
from tests.operator.conftest import EXAMPLES, OperatorThread, replica
from tests.support.kube import MAX_ANNOTATIONS_BYTES
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

GROUP, VERSION, PLURAL = "dagsmith.io", "v1", "workflows"


class Kube:
    """The few calls the tests make, through the official client."""

    def __init__(self, client: Any) -> None:
        import kubernetes

        self.errors = kubernetes.client.ApiException
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    def create(self, body: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return created

    def get(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return obj
        except self.errors as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, name: str, body: dict[str, Any], namespace: str = "default") -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)

    def delete(self, name: str, namespace: str = "default") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def events(self, name: str, namespace: str = "default") -> list[Any]:
        items = self.core.list_namespaced_event(namespace).items
        return [e for e in items if e.involved_object.name == name]

    def wait_status(self, name: str, check: Any, what: str, namespace: str = "default", timeout: float = 60) -> Any:
        def probe() -> Any:
            obj = self.get(name, namespace)
            status = (obj or {}).get("status") or {}
            return obj if check(status) else None

        return wait_until(probe, timeout=timeout, what=f"{name}: {what}", interval=0.1)

    def wait_event(self, name: str, reason: str, namespace: str = "default", timeout: float = 30) -> Any:
        return wait_until(
            lambda: [e for e in self.events(name, namespace) if e.reason == reason],
            timeout=timeout,
            what=f"a {reason} event for {name}",
            interval=0.1,
        )


@pytest.fixture(scope="module")
def kube_api(k8s: Any) -> Kube:
    return Kube(k8s)


def store(settings: Settings, sql: str, *args: Any) -> list[Any]:
    with psycopg.connect(settings.psycopg_dsn(), autocommit=True) as conn:
        return list(conn.execute(sql, args))


def workflow(name: str, *tasks: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"tasks": list(tasks)},
    }


def sleeper(name: str, seconds: float = 60) -> dict[str, Any]:
    return workflow(name, {"name": "nap", "type": "sleep", "params": {"seconds": seconds}, "timeout": "120s"})


def test_a_workflow_runs_on_the_engine_and_its_status_comes_back(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    doc = yaml.safe_load((EXAMPLES / "hello.yaml").read_text())
    created = kube_api.create(doc)

    obj = kube_api.wait_status("hello", lambda s: s.get("phase") == "Succeeded", "phase Succeeded")
    status = obj["status"]
    assert status["progress"] == "2/2"
    assert (status["total"], status["succeeded"], status["failed"]) == (2, 2, 0)
    assert status["reward"] > 0
    assert status["startedAt"] and status["finishedAt"]
    assert [t["phase"] for t in status["tasks"]] == ["succeeded", "succeeded"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Accepted"]["status"] == "True"
    assert conditions["Completed"]["status"] == "True" and conditions["Completed"]["reason"] == "Succeeded"
    assert conditions["Running"]["status"] == "False"
    assert obj["metadata"]["finalizers"] == ["dagsmith.io/cancel-on-delete"]
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1

    # The store has it as the REST API would: uid as the idempotency key, namespace and labels kept.
    [row] = store(
        engine_settings,
        "SELECT id, namespace, labels, source, status, output FROM workflows WHERE idempotency_key = %s",
        created["metadata"]["uid"],
    )
    assert str(row[0]) == status["workflowId"]
    assert row[1:5] == ("default", {"team": "demo"}, "kubernetes", "succeeded")
    assert row[5] == {"result": "HELLO WORLD"}

    kube_api.wait_event("hello", "Succeeded")
    reasons = [e.reason for e in kube_api.events("hello")]
    assert {"Submitted", "Started", "Succeeded"} <= set(reasons)
    assert reasons.count("Started") == 1 and reasons.count("Succeeded") == 1

    assert httpx.get(operator.liveness, timeout=5).status_code == 200


def test_deleting_the_resource_cancels_the_workflow_and_lets_go(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    kube_api.create(sleeper("napping"))
    obj = kube_api.wait_status("napping", lambda s: s.get("phase") == "Running", "phase Running")
    workflow_id = obj["status"]["workflowId"]

    delete_and_see_cancelled(kube_api, engine_settings, "napping", workflow_id, timeout=30)


def delete_and_see_cancelled(kube_api: Kube, settings: Settings, name: str, workflow_id: str, timeout: float) -> None:
    """Delete the resource: the finalizer lets go, and the workflow is cancelled in the store."""
    kube_api.delete(name)
    wait_until(lambda: kube_api.get(name) is None, timeout=timeout, what="the finalizer to be released")
    wait_until(
        lambda: store(settings, "SELECT status FROM workflows WHERE id = %s", workflow_id)[0][0] == "cancelled",
        timeout=timeout,
        what="the workflow to be cancelled in the store",
    )


def test_a_workflow_of_thousands_of_tasks_gets_its_status_and_can_be_deleted(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    """A spec larger than the API server allows annotations to be (256 KiB; the emulator refuses
    such a patch as the API server does): kopf's record of the last handled spec is a digest, so
    the status, the finalizer and its removal still go through."""
    tasks = [{"name": f"t{i:04}_{'x' * 55}", "type": "sleep", "params": {"seconds": 60}} for i in range(3000)]
    doc = workflow("big", *tasks)
    assert len(json.dumps(doc)) > MAX_ANNOTATIONS_BYTES
    kube_api.create(doc)
    obj = kube_api.wait_status("big", lambda s: s.get("phase") == "Running", "phase Running")
    assert obj["status"]["total"] == 3000 and obj["metadata"]["finalizers"] == ["dagsmith.io/cancel-on-delete"]
    workflow_id = obj["status"]["workflowId"]
    delete_and_see_cancelled(kube_api, engine_settings, "big", workflow_id, timeout=60)


def test_a_workflow_with_large_annotations_of_its_own_gets_its_status_and_can_be_deleted(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    """kopf's record of the last handled object held every annotation of the object: 150 KB of
    the user's own made it 150 KB too, and the two together went over the API server's limit."""
    doc = sleeper("annotated")
    doc["metadata"]["annotations"] = {"example.com/notes": "x" * 150_000}
    kube_api.create(doc)
    obj = kube_api.wait_status("annotated", lambda s: s.get("phase") == "Running", "phase Running")
    assert obj["metadata"]["finalizers"] == ["dagsmith.io/cancel-on-delete"]
    assert len(obj["metadata"]["annotations"]["dagsmith.io/last-handled-configuration"]) < 300
    delete_and_see_cancelled(kube_api, engine_settings, "annotated", obj["status"]["workflowId"], timeout=30)


def test_a_redelivered_create_creates_nothing_twice(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    created = kube_api.create(sleeper("twice", seconds=0.1), namespace="team-a")
    obj = kube_api.wait_status("twice", lambda s: s.get("workflowId"), "a workflow id", namespace="team-a")
    first_id = obj["status"]["workflowId"]

    # Forget that the create was handled (as after a crash before kopf recorded it): kopf runs the
    # create handler again, and the uid finds the same workflow.
    key = "dagsmith.io/last-handled-configuration"
    kube_api.patch("twice", {"metadata": {"annotations": {key: None}}}, namespace="team-a")
    wait_until(
        lambda: key in ((kube_api.get("twice", "team-a") or {}).get("metadata", {}).get("annotations") or {}),
        timeout=30,
        what="the create handler to run again",
    )
    rows = store(engine_settings, "SELECT id FROM workflows WHERE idempotency_key = %s", created["metadata"]["uid"])
    assert [str(r[0]) for r in rows] == [first_id]
    kube_api.wait_status("twice", lambda s: s.get("phase") == "Succeeded", "phase Succeeded", namespace="team-a")
    assert (kube_api.get("twice", "team-a") or {})["status"]["workflowId"] == first_id
    assert [e.reason for e in kube_api.events("twice", "team-a")].count("Submitted") == 1


def test_a_create_handled_again_after_an_edit_adopts_the_workflow_and_applies_the_cancel(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    """kopf also runs the create handler again when the resource changed before the first run was
    recorded: then ``spec.cancel: true`` or a new label made the document differ from the stored
    one, submitting it again was refused as another document under the same key (a permanent
    error), and the cancel was lost. The workflow stored under the uid is adopted instead."""
    created = kube_api.create(sleeper("adopted"), namespace="team-a")
    obj = kube_api.wait_status("adopted", lambda s: s.get("phase") == "Running", "phase Running", namespace="team-a")
    workflow_id = obj["status"]["workflowId"]

    key = "dagsmith.io/last-handled-configuration"
    edit = {"metadata": {"annotations": {key: None}, "labels": {"team": "other"}}, "spec": {"cancel": True}}
    kube_api.patch("adopted", edit, namespace="team-a")
    obj = kube_api.wait_status(
        "adopted", lambda s: s.get("phase") == "Cancelled", "phase Cancelled", namespace="team-a"
    )
    status = obj["status"]
    assert status["workflowId"] == workflow_id
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 2
    assert status["message"] == "cancelled by request"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Accepted"]["status"] == "True" and "SpecChangeRejected" not in conditions
    uid = created["metadata"]["uid"]
    rows = store(engine_settings, "SELECT id, status FROM workflows WHERE idempotency_key = %s", uid)
    assert [(str(r[0]), r[1]) for r in rows] == [(workflow_id, "cancelled")]
    kube_api.wait_event("adopted", "CancelRequested", namespace="team-a")
    assert [e.reason for e in kube_api.events("adopted", "team-a")].count("Submitted") == 1


def test_a_finished_workflow_adopted_again_gets_its_whole_final_status(
    operator: OperatorThread, kube_api: Kube
) -> None:
    """A create handled again after the status lost its phase: the stored workflow has finished,
    and the timer (which stops at a final phase) still fills in its counts and message."""
    doc = yaml.safe_load((EXAMPLES / "hello.yaml").read_text())
    doc["metadata"]["name"] = "adopted-done"
    kube_api.create(doc)
    kube_api.wait_status("adopted-done", lambda s: s.get("phase") == "Succeeded", "phase Succeeded")
    kube_api.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "adopted-done",
        {"status": {"phase": None, "message": None, "progress": None}},
    )
    key = "dagsmith.io/last-handled-configuration"
    kube_api.patch("adopted-done", {"metadata": {"annotations": {key: None}}})
    obj = kube_api.wait_status(
        "adopted-done", lambda s: s.get("phase") == "Succeeded" and s.get("progress") == "2/2", "its final status"
    )
    assert "waiting for the controller" not in (obj["status"].get("message") or "")


def test_spec_edits_are_rejected_but_cancel_is_honoured(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    kube_api.create(sleeper("immutable"))
    obj = kube_api.wait_status("immutable", lambda s: s.get("phase") == "Running", "phase Running")
    workflow_id = obj["status"]["workflowId"]

    kube_api.patch("immutable", {"spec": {"tasks": [{"name": "nap", "type": "sleep", "params": {"seconds": 1}}]}})
    obj = kube_api.wait_status(
        "immutable",
        lambda s: any(c["type"] == "SpecChangeRejected" and c["status"] == "True" for c in s.get("conditions", [])),
        "the SpecChangeRejected condition",
    )
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2
    [event] = kube_api.wait_event("immutable", "SpecChangeRejected")
    assert event.type == "Warning" and "spec.tasks[0].params.seconds" in event.message
    [[spec]] = store(engine_settings, "SELECT spec FROM workflows WHERE id = %s", workflow_id)
    assert spec["spec"]["tasks"][0]["params"] == {"seconds": 60}

    kube_api.patch("immutable", {"spec": {"cancel": True}})
    obj = kube_api.wait_status("immutable", lambda s: s.get("phase") == "Cancelled", "phase Cancelled")
    assert obj["status"]["message"] == "cancelled by request"  # not "cancelled: cancelled: cancelled by request"
    kube_api.wait_event("immutable", "CancelRequested")
    assert store(engine_settings, "SELECT status FROM workflows WHERE id = %s", workflow_id)[0][0] == "cancelled"


def test_an_invalid_spec_is_reported_and_nothing_is_stored(
    operator: OperatorThread, kube_api: Kube, engine_settings: Settings
) -> None:
    cycle = workflow(
        "loop",
        {"name": "a", "type": "noop", "dependsOn": ["b"]},
        {"name": "b", "type": "noop", "dependsOn": ["a"]},
    )
    created = kube_api.create(cycle)
    obj = kube_api.wait_status("loop", lambda s: s.get("phase") == "Failed", "phase Failed")
    [accepted] = [c for c in obj["status"]["conditions"] if c["type"] == "Accepted"]
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "cycle" in obj["status"]["message"]
    kube_api.wait_event("loop", "InvalidSpec")
    uid = created["metadata"]["uid"]
    assert store(engine_settings, "SELECT id FROM workflows WHERE idempotency_key = %s", uid) == []


def test_a_failing_task_is_reported_in_status_and_events(operator: OperatorThread, kube_api: Kube) -> None:
    doc = workflow(
        "doomed",
        {"name": "first", "type": "echo", "params": {"value": 1}},
        {
            "name": "second",
            "type": "chaos.fail",
            "dependsOn": ["first"],
            "params": {"class": "permanent", "message": "no way"},
        },
    )
    kube_api.create(doc)
    obj = kube_api.wait_status("doomed", lambda s: s.get("phase") == "Failed", "phase Failed")
    status = obj["status"]
    assert (status["succeeded"], status["failed"]) == (1, 1)
    failed = status["tasks"][0]  # failed tasks are listed first
    assert failed["name"] == "second" and failed["phase"] == "failed"
    assert failed["error"].startswith("permanent: no way")
    events = kube_api.wait_event("doomed", "TaskFailed")
    # Each TaskFailed Event names the failed task. (A CI run listed two: the mirror had read the
    # workflow's counters and its task lines at two moments, and counted the failure again as
    # "1 more task(s) failed". It now reads both in one snapshot.)
    messages = [e.message for e in events]
    assert all(e.type == "Warning" and e.message.startswith("task second (chaos.fail) failed") for e in events), (
        messages
    )
    kube_api.wait_event("doomed", "Failed")


def test_a_surgery_shows_in_status_and_as_an_event(operator: OperatorThread, kube_api: Kube) -> None:
    """Correction Mode retries a task that fails once: the resource counts the surgery and says so."""
    kube_api.create(workflow("mended", {"name": "blip", "type": "chaos.flaky", "params": {"failTimes": 1}}))
    obj = kube_api.wait_status("mended", lambda s: s.get("phase") == "Succeeded", "phase Succeeded")
    assert obj["status"]["surgeries"] == 1
    [event] = kube_api.wait_event("mended", "SurgeryApplied")
    assert event.type == "Normal" and "1 DAG surgery(ies) applied" in event.message


def test_two_replicas_one_active_and_the_other_takes_over(
    operator: OperatorThread, kube_api: Kube, kube: Any, engine_settings: Settings
) -> None:
    standby = replica(engine_settings, "replica-b", priority=100).start()
    try:
        peering = "/apis/kopf.dev/v1/namespaces/default/kopfpeerings/dagsmith"
        wait_until(
            lambda: {"replica-a", "replica-b"} <= set(httpx.get(kube.url + peering).json().get("status", {})),
            timeout=30,
            what="both replicas in the peering object",
        )

        kube_api.create(workflow("first", {"name": "hi", "type": "echo", "params": {"value": 1}}))
        kube_api.wait_status("first", lambda s: s.get("phase") == "Succeeded", "phase Succeeded")
        instances = {e.reporting_instance for e in kube_api.events("first")}
        assert instances == {"replica-a"}

        operator.stop()  # a clean exit leaves the peering at once: the standby resumes
        kube_api.create(workflow("second", {"name": "hi", "type": "echo", "params": {"value": 2}}))
        kube_api.wait_status("second", lambda s: s.get("phase") == "Succeeded", "phase Succeeded")
        assert {e.reporting_instance for e in kube_api.events("second")} == {"replica-b"}
        assert len(store(engine_settings, "SELECT 1 FROM workflows WHERE name IN ('first', 'second')")) == 2
    finally:
        standby.stop()


def test_an_operator_for_every_namespace_serves_them_all(
    operator: OperatorThread, kube_api: Kube, kube: Any, engine_settings: Settings
) -> None:
    """--all-namespaces: kopf watches cluster-wide and peers through the ClusterKopfPeering."""
    if operator.thread.is_alive():
        operator.stop()  # one operator at a time on these objects
    everywhere = replica(engine_settings, "replica-all", priority=100, namespaces=()).start()
    try:
        peering = "/apis/kopf.dev/v1/clusterkopfpeerings/dagsmith"
        wait_until(
            lambda: "replica-all" in httpx.get(kube.url + peering).json().get("status", {}),
            timeout=30,
            what="the replica in the cluster peering object",
        )
        for namespace in ("default", "team-a"):
            kube_api.create(workflow(f"everywhere-{namespace}", {"name": "hi", "type": "noop"}), namespace)
        for namespace in ("default", "team-a"):
            obj = kube_api.wait_status(
                f"everywhere-{namespace}", lambda s: s.get("phase") == "Succeeded", "phase Succeeded", namespace
            )
            assert obj["status"]["workflowId"]
        rows = store(engine_settings, "SELECT namespace FROM workflows WHERE name LIKE 'everywhere-%%'")
        assert sorted(r[0] for r in rows) == ["default", "team-a"]
    finally:
        everywhere.stop()


def test_the_command_serves_liveness_joins_the_peering_and_stops_cleanly(kube: Any, engine: Any, tmp_path: Any) -> None:
    """``dagsmith operator`` as a process, stopped with SIGTERM as Kubernetes stops a pod."""
    import signal
    import subprocess
    import sys

    from tests.support.stack import ROOT, free_port

    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    env = engine.env({"KUBECONFIG": str(kube.kubeconfig), "POD_ID": "cli-replica"})
    args = ["operator", "--namespace", "default", "--namespace", "team-a", "--liveness", liveness]
    with open(tmp_path / "operator.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dagsmith", *args], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            peering = kube.url + "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/dagsmith"

            def live() -> bool:
                try:
                    return httpx.get(liveness, timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(live, timeout=30, what="the liveness endpoint")
            wait_until(
                lambda: "cli-replica" in httpx.get(peering).json().get("status", {}),
                timeout=30,
                what="the replica in the peering object",
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert "cli-replica" not in httpx.get(peering).json().get("status", {})
        finally:
            if proc.poll() is None:
                proc.kill()
