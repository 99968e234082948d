"""Services started on a database that `dagsmith migrate` has not brought to this build's schema:
the controller refuses in one line (exit 2), the API serves on, not ready, until the migration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from controller.migrate import SchemaOutdated, state_of, upgrade
from tests.conftest import create_database, drop_database, make_settings

HEAD = state_of(None).head


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"dagsmith_schema_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


def test_a_schema_is_behind_when_missing_or_older_and_ahead_when_unknown() -> None:
    assert state_of(None).behind and state_of("0001").behind and not state_of(HEAD).behind
    assert (
        state_of("0001").problem()
        == f"the database schema is at revision 0001, this build needs {HEAD}: run dagsmith migrate"
    )
    newer = state_of("9999_from_a_newer_build")
    assert newer.ahead and not newer.behind and "a newer build migrated it" in newer.problem()


async def test_the_controller_refuses_an_older_schema_before_its_first_query(empty_database: str) -> None:
    from controller.service import Controller

    upgrade(empty_database, "0007")
    controller = Controller(make_settings(empty_database, f"s{uuid.uuid4().hex[:8]}"))
    with pytest.raises(SchemaOutdated) as raised:
        await asyncio.wait_for(controller.run(asyncio.Event()), timeout=60)
    assert (
        str(raised.value) == f"the database schema is at revision 0007, this build needs {HEAD}: run dagsmith migrate"
    )


def test_the_controller_command_says_so_in_one_line_and_exits_2(empty_database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env.update(
        {"DAGSMITH_DATABASE_URL": empty_database, "DAGSMITH_METRICS_PORT": "-1", "DAGSMITH_LOG_FORMAT": "console"}
    )
    done = subprocess.run(
        [sys.executable, "-m", "dagsmith", "controller"], capture_output=True, text=True, env=env, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert (
        f"the database schema is at revision base (no schema), this build needs {HEAD}: run dagsmith migrate" in output
    )
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output


def test_the_api_is_not_ready_until_migrated_and_then_is_without_a_restart(empty_database: str) -> None:
    from api.app import create_app

    settings = make_settings(empty_database, f"s{uuid.uuid4().hex[:8]}", auth=False)
    doc = (
        b"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: early}\nspec:\n  tasks: [{name: a, type: noop}]"
    )
    with TestClient(create_app(settings)) as api:
        ready = api.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["schema"] == (
            f"the database schema is at revision base (no schema), this build needs {HEAD}: run dagsmith migrate"
        )
        submitted = api.post("/v1/workflows", content=doc, headers={"Content-Type": "application/yaml"})
        assert submitted.status_code == 503, submitted.text  # not a 500 "internal error"
        assert submitted.json()["error"]["code"] == "schema_outdated"
        assert "run dagsmith migrate" in submitted.json()["error"]["message"]

        upgrade(empty_database)
        ready = api.get("/readyz")
        assert ready.status_code == 200 and "schema" not in ready.json()["checks"], ready.text
        submitted = api.post("/v1/workflows", content=doc, headers={"Content-Type": "application/yaml"})
        assert submitted.status_code == 201, submitted.text
