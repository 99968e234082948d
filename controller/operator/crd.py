"""The ``workflows.dagsmith.io`` CustomResourceDefinition, generated from the pydantic models.

One schema source: ``spec`` is :class:`dagsmith.spec.WorkflowBody` (what the REST API takes) and
``status`` is :class:`controller.operator.status.WorkflowStatus`. Kubernetes accepts only
*structural* schemas, so pydantic's JSON Schema is converted: ``$ref`` inlined, ``anyOf`` with
``null`` turned into ``nullable``, free-form values marked ``x-kubernetes-preserve-unknown-fields``,
``additionalProperties: false`` dropped (the API server prunes unknown fields; ``kubectl``'s
strict field validation reports them), and no ``default`` (pydantic applies defaults; defaults in
the CRD would be written into the user's object).

``python -m controller.operator.crd > charts/dagsmith/crds/workflows.yaml`` writes the file;
a test checks the committed file is up to date.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from controller.operator.status import WorkflowStatus
from dagsmith.spec import WorkflowBody

GROUP = "dagsmith.io"
VERSION = "v1"
PLURAL = "workflows"
KIND = "Workflow"

# Keywords a structural schema may carry (besides the structure: type, properties, items, ...).
_KEEP = {
    "description",
    "pattern",
    "format",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "required",
    "example",
}


class SchemaError(ValueError):
    """The model uses a JSON Schema construct with no structural equivalent."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
    return merged


def structural(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Convert one pydantic JSON Schema node into a Kubernetes structural schema node."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
    nullable = False
    if "anyOf" in node:
        variants = [_resolve(v, defs) for v in node["anyOf"]]
        nullable = any(v.get("type") == "null" for v in variants)
        variants = [v for v in variants if v.get("type") != "null"]
        if len(variants) != 1:
            raise SchemaError(f"{path or '.'}: anyOf with {len(variants)} non-null variants has no structural form")
        inner = structural(variants[0], defs, path)
        out = {**inner, **out}
    elif "type" in node:
        out["type"] = node["type"]
        if node["type"] == "object":
            props = node.get("properties")
            extra = node.get("additionalProperties")
            if props:
                out["properties"] = {k: structural(v, defs, f"{path}.{k}") for k, v in props.items()}
            elif isinstance(extra, dict) and extra:
                out["additionalProperties"] = structural(extra, defs, f"{path}.*")
            elif extra is not False:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif node["type"] == "array":
            out["items"] = structural(node.get("items", {}), defs, f"{path}[]")
    else:
        # Any: free-form JSON (params values, output, default). Any type, including null.
        out["x-kubernetes-preserve-unknown-fields"] = True
        nullable = True
    if nullable:
        out["nullable"] = True
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def structural_problems(node: Any, path: str = "") -> list[str]:
    """What would make the API server reject ``node`` as a structural schema (empty: fine)."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return [f"{path or '.'}: not an object"]
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if "type" not in node and not free:
        problems.append(f"{path or '.'}: no type")
    for bad in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "const", "default", "title"):
        if bad in node:
            problems.append(f"{path or '.'}: {bad} is not allowed here")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path or '.'}: properties and additionalProperties together")
    if node.get("additionalProperties") is False:
        problems.append(f"{path or '.'}: additionalProperties: false")
    for key, sub in (node.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def open_api_schema() -> dict[str, Any]:
    spec = model_schema(WorkflowBody)
    spec["description"] = "The workflow: the same document the REST API takes under spec."
    status = model_schema(WorkflowStatus)
    status["description"] = "Mirrored from the Dagsmith store by the operator."
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Surgeries", "type": "integer", "jsonPath": ".status.surgeries"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.reward"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def crd() -> dict[str, Any]:
    schema = open_api_schema()
    problems = structural_problems(schema)
    if problems:
        raise SchemaError("; ".join(problems))
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "dagsmith", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "workflow",
                "shortNames": ["dwf"],
                "categories": ["dagsmith"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


HEADER = (
    "# Generated from dagsmith.spec.WorkflowBody and controller.operator.status.WorkflowStatus.\n"
    "# Do not edit: run `python -m controller.operator.crd > charts/dagsmith/crds/workflows.yaml`.\n"
)


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
