"""Fixtures of the fault suite: private servers for the session, one installation per test, a report.

The figures of every fault test are collected and printed at the end of the run; with
``DAGSMITH_FAULTS_REPORT=path.json`` they are also written there (``project_logs/reliability.md``
is made from them).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checks import Verdict
from tests.faults.harness import Infra, Installation
from tests.faults.infra import missing_binaries

REPORT: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    why = missing_binaries()
    if why:
        pytest.skip(f"fault tests need private Postgres and RabbitMQ servers: {why}")
    with Infra.running() as running:
        yield running


@pytest.fixture
def installation(infra: Infra, request: pytest.FixtureRequest) -> Iterator[Callable[..., Installation]]:
    """Make (and start) this test's installation; everything it started is stopped afterwards."""
    made: list[Installation] = []

    def make(executors: int = 2, controllers: int = 1, **overrides: Any) -> Installation:
        logdir = infra.root / "logs" / f"{request.node.name}-{len(made)}"
        logdir.mkdir(parents=True)
        inst = Installation(infra, logdir, **overrides)
        made.append(inst)
        inst.start(executors=executors, controllers=controllers)
        return inst

    yield make
    for inst in made:
        inst.stop()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    def record(inst: Installation, verdict: Verdict, wall_s: float, **extra: Any) -> None:
        REPORT.append(
            {
                "test": request.node.name,
                **verdict.figures(),
                "faults": [
                    {"name": f.name, "downtime_s": f.downtime_s, "recover_s": f.recover_s, **f.notes}
                    for f in inst.faults
                ],
                "wall_s": round(wall_s, 1),
                **extra,
            }
        )

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    terminalreporter.section("fault figures")
    for row in REPORT:
        faults = "; ".join(
            f"{f['name']}: down {f['downtime_s']:.1f}s, recovered in "
            + (f"{f['recover_s']:.2f}s" if f["recover_s"] is not None else "-")
            for f in row["faults"]
        )
        terminalreporter.write_line(
            f"{row['test']}: {row['workflows']} workflows, {row['tasks']} tasks, lost {row['lost']}, "
            f"duplicated {row['duplicated']}, extra attempts {row['extra_attempts']}, "
            f"messages sent again {row.get('redriven', '-')}, {faults}"
        )
    path = os.environ.get("DAGSMITH_FAULTS_REPORT")
    if path:
        Path(path).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                    "tests": REPORT,
                },
                indent=2,
            )
        )
