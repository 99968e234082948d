"""A task's ``expect``: the JSON Schema its output must satisfy, checked at submission and scored
by the evaluator with the same rules.

References (``$ref``) resolve inside the schema only. Nothing is fetched: a remote reference would
have the evaluator open any URL a submitter names, and one that cannot resolve would fail every
result of the task — so both are refused when the workflow is submitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

_BASE = "urn:dagsmith:expect"  # where a schema without an $id of its own is said to live


def _registry(schema: dict[str, Any]) -> tuple[Registry[Any], str]:
    resource = Resource.from_contents(schema, default_specification=DRAFT202012)
    base = resource.id() or _BASE
    return Registry().with_resource(base, resource).crawl(), base  # no retrieval: local references only


def validator(schema: dict[str, Any]) -> Any:
    """A validator for ``schema`` that never fetches anything."""
    registry, _ = _registry(schema)
    return jsonschema.validators.validator_for(schema)(schema, registry=registry)


# Keywords whose values are data, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _unresolved(value: Any, resolver: Any) -> Iterator[str]:
    """The references in ``value`` that do not resolve, each looked up in its own scope (a
    subschema with an ``$id`` of its own is a new base for the references inside it)."""
    if isinstance(value, dict):
        if isinstance(value.get("$id"), str):
            resolver = resolver.in_subresource(Resource.from_contents(value, default_specification=DRAFT202012))
        for key, item in value.items():
            if key in ("$ref", "$dynamicRef") and isinstance(item, str):
                try:
                    resolver.lookup(item)
                except Unresolvable:
                    yield item
            elif key not in _DATA_KEYWORDS:
                yield from _unresolved(item, resolver)
    elif isinstance(value, list):
        for item in value:
            yield from _unresolved(item, resolver)


def problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` cannot be an ``expect``, or None."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    try:
        registry, base = _registry(schema)
    except Exception as exc:  # referencing's own complaints about the document
        return f"not a usable JSON Schema: {exc}"
    for ref in _unresolved(schema, registry.resolver(base_uri=base)):
        return (
            f"$ref {ref!r} does not resolve within the schema (references must point inside it, "
            "e.g. '#/$defs/name'; nothing is fetched)"
        )
    return None
