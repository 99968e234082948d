"""Schemathesis drives the live API from its own OpenAPI schema — valid and invalid inputs — and
checks every answer: no 5xx, and each response matches what the schema documents."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.e2e.conftest import auth
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


def operations(stack: Stack) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(stack: Stack, mode: GenerationMode) -> None:
    headers = auth(stack)
    checked = []
    for operation in operations(stack):

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            excluded = []
            if case.operation.label in SEMANTIC_422:
                excluded.append(positive_data_acceptance)
            case.call_and_validate(headers=headers, timeout=15, excluded_checks=excluded)

        try:
            run()
        except Unsatisfiable:
            # Nothing invalid can be built for it (e.g. GET /healthz has no inputs at all).
            assert mode == GenerationMode.NEGATIVE, operation.label
            continue
        checked.append(operation.label)
    assert len(checked) >= 12, checked  # the routes were exercised
