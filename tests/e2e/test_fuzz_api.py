"""Schemathesis drives the live API from its own OpenAPI schema — valid and invalid inputs — and
checks every answer: no 5xx, and each response matches what the schema documents."""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from dagsmith.client import Client
from tests.e2e.conftest import auth, submit, wait_finished, workflow
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

# Operations whose schema-valid input may still be a documented 422, because the rule cannot be
# written in JSON Schema: the graph rules of a workflow document (unique names, no cycles,
# references to upstream tasks only), an opaque pagination cursor, a surgery on a task that is not
# optional or a type that does not exist yet.
SEMANTIC_422 = {
    "POST /v1/workflows",
    "GET /v1/workflows",
    "POST /v1/workflows/{workflow_id}/surgery",
    "POST /v1/tokens",
}
EXAMPLES = 20  # per operation and mode: ~25 operations x 2 modes x 20 = about a thousand requests


# Invalid input may be refused as 414 too: a query past the API's 8 KiB limit on the request
# target is refused before its values are read (api.middleware.MAX_TARGET_BYTES).
CONFIG = {
    "checks": {
        "negative_data_rejection": {
            "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "414", "415", "422", "428", "429"]
        }
    }
}


def operations(stack: Stack) -> list[Any]:
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json", config=config)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(stack: Stack, client: Client, mode: GenerationMode) -> None:
    headers = auth(stack)
    # A random id only ever finds nothing: every other case of a route under a workflow is sent
    # to a real one instead (finished and failed, so surgeries have something to work on), so
    # those routes are fuzzed past their 404.
    doc = workflow(
        f"fuzz-{mode.value}",
        {"name": "a", "type": "chaos.fail", "params": {"class": "permanent"}},
        {"name": "b", "type": "noop", "dependsOn": ["a"]},
        correction={"mode": "off"},
    )
    real = submit(client, doc)
    wait_finished(client, real)
    turn = iter(range(10**9))
    reached: set[str] = set()  # routes that answered something other than 404 for the real workflow
    checked = []
    for operation in operations(stack):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            # The same cases every run, so CI is reproducible; DAGSMITH_FUZZ_EXPLORE=1 draws new ones.
            derandomize=not os.environ.get("DAGSMITH_FUZZ_EXPLORE"),
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            excluded = []
            if case.operation.label in SEMANTIC_422:
                excluded.append(positive_data_acceptance)
            if any(isinstance(v, dict) for v in (case.query or {}).values()):
                # An object in the query is sent form-exploded ({"name": "x"} as name=x): on the
                # wire it is a valid value, so accepting it is right (a CI run's false alarm).
                excluded.append(negative_data_rejection)
            # Not DELETE: it would remove the workflow every later operation is aimed at (its own
            # tests are in test_cli and test_auth).
            aimed = (
                "workflow_id" in (case.path_parameters or {})
                and case.operation.method.upper() != "DELETE"
                and next(turn) % 2 == 0
            )
            if aimed:
                case.path_parameters = {**case.path_parameters, "workflow_id": real}
            response = case.call_and_validate(headers=headers, timeout=15, excluded_checks=excluded)
            if aimed and response.status_code != 404:
                reached.add(case.operation.label)

        try:
            run()
        except Unsatisfiable:
            # Nothing invalid can be built for it (e.g. GET /healthz has no inputs at all).
            assert mode == GenerationMode.NEGATIVE, operation.label
            continue
        checked.append(operation.label)
    assert len(checked) >= 12, checked  # the routes were exercised
    assert len(reached) >= 5, reached  # and those under a workflow, on a real one
