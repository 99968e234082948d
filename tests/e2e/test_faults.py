"""Crashes on purpose: a killed controller, two controllers at once, a poison message."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from dagsmith.client import Client
from dagsmith.settings import Settings
from tests.e2e.conftest import pg, submit, wait_finished, workflow
from tests.support.stack import Stack
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e
FINAL = ("succeeded", "failed", "cancelled")


def chain(name: str, n: int, seconds: float) -> dict[str, object]:
    tasks = [{"name": "t0", "type": "sleep", "params": {"seconds": seconds}}]
    tasks += [
        {"name": f"t{i}", "type": "sleep", "dependsOn": [f"t{i - 1}"], "params": {"seconds": seconds}}
        for i in range(1, n)
    ]
    return workflow(name, *tasks)


def succeeded_transitions(settings: Settings, wid: str) -> dict[str, int]:
    with pg(settings) as conn:
        rows = conn.execute(
            "SELECT task_name, count(*) FROM task_events WHERE workflow_id = %s AND to_status = 'succeeded' "
            "AND task_id IS NOT NULL GROUP BY 1",
            (wid,),
        ).fetchall()
    return dict(rows)


def test_controller_sigkill_mid_workflow(stack: Stack, client: Client, settings: Settings) -> None:
    wid = submit(client, chain("survivor", 20, 0.1))
    wait_until(lambda: client.workflow(wid)["progress"]["succeeded"] >= 5, timeout=30, what="a few tasks to finish")
    stack.kill("controller")
    done_at_kill = client.workflow(wid)["progress"]["succeeded"]
    assert client.workflow(wid)["status"] == "running"
    stack.start("controller", "controller")
    wf = wait_finished(client, wid, timeout=60)
    assert wf["status"] == "succeeded", wf
    assert wf["progress"]["succeeded"] == 20
    assert done_at_kill < 20
    # every result applied exactly once
    assert succeeded_transitions(settings, wid) == {f"t{i}": 1 for i in range(20)}


def test_two_controllers_never_double_dispatch(stack: Stack, client: Client, settings: Settings) -> None:
    stack.start("controller-2", "controller")
    try:
        tasks = [{"name": "root", "type": "noop"}]
        tasks += [{"name": f"w{i}", "type": "noop", "dependsOn": ["root"]} for i in range(300)]
        tasks += [{"name": f"x{i}", "type": "noop", "dependsOn": [f"w{i}"]} for i in range(300)]
        ids = [submit(client, workflow(f"pair-{k}", *tasks)) for k in range(3)]
        for wid in ids:
            assert wait_finished(client, wid, timeout=120)["status"] == "succeeded"
        with pg(settings) as conn:
            dupes = conn.execute(
                "SELECT task_id, attempt, count(*) FROM task_events WHERE workflow_id = ANY(%s::uuid[]) "
                "AND to_status = 'queued' GROUP BY 1, 2 HAVING count(*) > 1",
                (ids,),
            ).fetchall()
            attempts = conn.execute(
                "SELECT max(attempt) FROM tasks WHERE workflow_id = ANY(%s::uuid[])", (ids,)
            ).fetchone()
        assert dupes == []
        assert attempts == (1,)
        for wid in ids:
            assert set(succeeded_transitions(settings, wid).values()) == {1}
        # one controller dies: the other carries on alone
        stack.kill("controller-2")
        wid = submit(client, chain("after-pair", 5, 0.01))
        assert wait_finished(client, wid, timeout=60)["status"] == "succeeded"
    finally:
        if stack.procs["controller-2"].alive():
            stack.stop("controller-2")


def test_poison_message_is_failed_after_max_deliveries(stack: Stack, client: Client, settings: Settings) -> None:
    wid = submit(client, workflow("poison", {"name": "boom", "type": "chaos.crash", "retry": {"limit": 3}}))
    # A dedicated executor that crashes on chaos.crash; restart it each time it dies, until the
    # broker gives up on the message and the controller fails the task.
    crashes = 0
    try:
        for _ in range(settings.max_deliveries + 2):
            proc = stack.start("crasher", "executor", "--types", "chaos.crash", "--allow-crash")
            proc.popen.wait(timeout=60)
            stack.stop("crasher")
            crashes += 1
            try:
                wait_until(
                    lambda: client.tasks(wid)["items"][0]["status"] == "failed", timeout=3, what="the task to fail"
                )
                break
            except AssertionError:
                continue
        wf = wait_finished(client, wid, timeout=30)
    finally:
        if "crasher" in stack.procs and stack.procs["crasher"].alive():
            stack.stop("crasher")
    assert wf["status"] == "failed"
    (task,) = client.tasks(wid)["items"]
    assert task["error"]["class"] == "poison"
    assert "dead-lettered" in task["error"]["message"]
    assert crashes == settings.max_deliveries
    assert task["error"]["details"]["deliveries"] == settings.max_deliveries


def test_a_message_returned_by_dropped_connections_is_sent_again_not_failed_as_poison(
    stack: Stack, client: Client, settings: Settings
) -> None:
    """Connection drops and broker restarts count towards the delivery limit too. A message that
    reaches the limit without an executor ever starting its last delivery is sent again by the
    controller (with a fresh count), and its task then runs and succeeds."""
    import aio_pika

    from dagsmith.messages import TaskMessage

    wid = submit(client, workflow("churned", {"name": "t", "type": "chaos.crash", "params": {"spare": True}}))
    wait_until(lambda: client.tasks(wid)["items"][0]["status"] == "queued", timeout=20, what="the task to be queued")
    queue_name = f"{settings.amqp_prefix}.task.chaos.crash"

    async def churn() -> None:
        """Take the message and lose it, as a dropped connection does, until it is dead-lettered."""
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        try:
            for _ in range(settings.max_deliveries):
                channel = await connection.channel()
                queue = await channel.declare_queue(queue_name, passive=True)
                message = await queue.get(timeout=10)
                assert TaskMessage.model_validate_json(message.body).redrives == 0
                await channel.close()  # unacked: the broker takes it back and counts a delivery
        finally:
            await connection.close()

    async def peek() -> TaskMessage | None:
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, passive=True)
            message = await queue.get(fail=False)
            if message is None:
                return None
            await message.reject(requeue=True)
            return TaskMessage.model_validate_json(message.body)
        finally:
            await connection.close()

    asyncio.run(churn())
    again = wait_until(lambda: asyncio.run(peek()), timeout=20, what="the message to come back", interval=0.2)
    assert again.task_id == client.tasks(wid)["items"][0]["id"] and (again.redrives, again.series) == (1, 1)
    assert client.tasks(wid)["items"][0]["status"] == "queued"  # not failed as poison
    stack.start("taker", "executor", "--types", "chaos.crash", "--allow-crash")
    try:
        wf = wait_finished(client, wid, timeout=30)
    finally:
        stack.stop("taker")
    assert wf["status"] == "succeeded", wf
    (task,) = client.tasks(wid)["items"]
    assert task["attempt"] == 1  # the same attempt, sent again


STUCK_PLUGIN = """
import time

from executors.registry import executor


@executor("t.stuck", description="Blocks its thread for an hour, whatever its timeout.")
def stuck(params, ctx):
    time.sleep(3600)
    return {}


@executor("t.quick", description="A quick synchronous task.")
def quick(params, ctx):
    return {"ok": True}
"""


def test_a_stuck_sync_handler_holds_up_neither_later_tasks_nor_a_shutdown(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    """A synchronous handler past its timeout keeps its thread (threads cannot be stopped). More
    of them than a thread pool would hold must not starve later tasks, and the executor must
    still exit when told to stop instead of waiting on those threads for ever."""
    (tmp_path / "stuck_plugin.py").write_text(STUCK_PLUGIN)
    stack.start(
        "stuck",
        "executor",
        "--module",
        "stuck_plugin",
        "--types",
        "t.*",
        "--concurrency",
        "1",
        env={"PYTHONPATH": str(tmp_path)},
    )
    try:
        hung = [{"name": f"s{i}", "type": "t.stuck", "timeout": "300ms"} for i in range(8)]
        first = wait_finished(client, submit(client, workflow("stuck", *hung, correction={"mode": "off"})), timeout=60)
        assert first["status"] == "failed" and first["progress"]["failed"] == 8
        later = submit(client, workflow("after-stuck", {"name": "q", "type": "t.quick", "timeout": "10s"}))
        assert wait_finished(client, later, timeout=30)["status"] == "succeeded"
        assert "still running after its attempt ended" in stack.procs["stuck"].tail(200)
    finally:
        code = stack.stop("stuck", timeout=15)
    assert code == 0, f"the executor did not exit on SIGTERM (code {code}):\n{stack.procs['stuck'].tail()}"


def test_executor_killed_mid_task_is_redelivered(stack: Stack, client: Client) -> None:
    stack.start("victim", "executor", "--types", "sleep")
    try:
        stack.wait_executors(2)
        stack.stop("executor")  # leave only the victim to take sleep tasks
        wid = submit(client, workflow("redeliver", {"name": "s", "type": "sleep", "params": {"seconds": 1.5}}))
        wait_until(lambda: client.workflow(wid)["progress"]["running"] == 1, timeout=20, what="the sleep to start")
        stack.signal("victim", signal.SIGKILL)
        stack.procs["victim"].popen.wait(timeout=10)
        stack.start_executor()
        wf = wait_finished(client, wid, timeout=60)
        assert wf["status"] == "succeeded"
        (task,) = client.tasks(wid)["items"]
        assert task["attempt"] == 1  # the same attempt, redelivered by the broker
    finally:
        if stack.procs["victim"].alive():
            stack.stop("victim")
        if not stack.procs["executor"].alive():
            stack.start_executor()


def test_a_poison_task_in_a_bundle_is_singled_out(stack: Stack, client: Client, settings: Settings) -> None:
    """Many ready tasks of a fast type travel in bundles. A bundle holding a poison task is
    dead-lettered after the delivery limit, split into single messages, and then only the poison
    task is failed: its bundle-mates succeed.

    The crasher takes one message at a time: a crash puts back every unacked message the executor
    holds, and counts a delivery for each (see guarantees.md)."""
    crasher = ("executor", "--types", "chaos.crash", "--allow-crash", "--concurrency", "1")
    crashes = 0
    try:
        stack.start("crasher", *crasher)
        # Spared chaos.crash tasks return at once: the controller learns the type is fast.
        spared = [{"name": f"s{i}", "type": "chaos.crash", "params": {"spare": True}} for i in range(40)]
        assert wait_finished(client, submit(client, workflow("spared", *spared)), timeout=60)["status"] == "succeeded"
        tasks = [{"name": f"ok{i}", "type": "chaos.crash", "params": {"spare": True}} for i in range(31)]
        tasks.insert(13, {"name": "boom", "type": "chaos.crash"})
        # No Correction Mode: its answer to poison is to abort, which would cancel the bundle-mates.
        wid = submit(client, workflow("bundled-poison", *tasks, correction={"mode": "off"}))
        for _ in range(4 * settings.max_deliveries):
            proc = stack.procs["crasher"]
            wait_until(
                lambda: not proc.alive() or client.workflow(wid)["status"] in FINAL,  # noqa: B023
                timeout=30,
                what="the crasher to die or the workflow to finish",
            )
            if not proc.alive():
                crashes += 1
                stack.stop("crasher")
                stack.start("crasher", *crasher)
            if client.workflow(wid)["status"] in FINAL:
                break
        wf = wait_finished(client, wid, timeout=30)
    finally:
        if "crasher" in stack.procs and stack.procs["crasher"].alive():
            stack.stop("crasher")
    assert wf["status"] == "failed"
    by_name = {t["name"]: t for t in client.tasks(wid, limit=100)["items"]}
    assert by_name["boom"]["status"] == "failed" and by_name["boom"]["error"]["class"] == "poison"
    assert {n: t["status"] for n, t in by_name.items() if n != "boom"} == {f"ok{i}": "succeeded" for i in range(31)}
    # The bundle's deliveries, then the single message's: twice what a task sent alone takes.
    assert crashes == 2 * settings.max_deliveries, crashes


def test_an_executor_that_connects_after_a_cancel_does_not_run_its_waiting_tasks(
    stack: Stack, client: Client, settings: Settings
) -> None:
    """The cancel broadcast went out while no executor for chaos.crash was connected; its message
    waited in the queue. An executor that starts later asks for the recent cancellations and drops
    it: had it run it, the process would have died."""
    import aio_pika

    wid = submit(client, workflow("cancelled-while-waiting", {"name": "boom", "type": "chaos.crash"}))
    wait_until(lambda: client.tasks(wid)["items"][0]["status"] == "queued", timeout=20, what="the task to be queued")
    client.cancel(wid)
    assert wait_finished(client, wid, timeout=20)["status"] == "cancelled"

    async def waiting() -> int:
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{settings.amqp_prefix}.task.chaos.crash", passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await connection.close()

    assert asyncio.run(waiting()) == 1  # still there, for whoever takes chaos.crash next
    proc = stack.start("late", "executor", "--types", "chaos.crash", "--allow-crash")
    try:
        wait_until(lambda: asyncio.run(waiting()) == 0, timeout=30, what="the late executor to take the message")
        wait_until(
            lambda: any(
                e["alive"] and "chaos.crash" in {c["type"] for c in e["capabilities"]} for e in client.executors()
            ),
            timeout=30,
            what="the late executor to heartbeat",
        )
        assert proc.alive(), proc.tail()  # it dropped the task instead of running it
        assert client.tasks(wid)["items"][0]["status"] == "cancelled"
    finally:
        stack.stop("late")


def test_an_executor_that_missed_a_cancel_broadcast_is_told_again_by_its_heartbeat(
    stack: Stack, client: Client, settings: Settings
) -> None:
    """The broadcast is sent once, after the round commits: a broker blip or a controller crash in
    between loses it. The workflow is cancelled here straight in Postgres, so no broadcast is sent
    at all; the executor still running its attempt hears of it in answer to a heartbeat."""
    wid = submit(client, workflow("missed-broadcast", {"name": "long", "type": "sleep", "params": {"seconds": 120}}))

    def running() -> int:
        return sum(e["running"] for e in client.executors() if e["alive"])

    wait_until(lambda: client.tasks(wid)["items"][0]["status"] == "running", timeout=20, what="the task to start")
    wait_until(lambda: running() >= 1, timeout=20, what="a heartbeat to report the attempt running")
    with pg(settings) as conn:
        conn.execute(
            "UPDATE workflows SET status = 'cancelled', cancel_requested = true, finished_at = now() WHERE id = %s",
            (wid,),
        )
        conn.execute("UPDATE tasks SET status = 'cancelled', finished_at = now() WHERE workflow_id = %s", (wid,))
    wait_until(lambda: running() == 0, timeout=20, what="the executor to stop the attempt it was told about again")
