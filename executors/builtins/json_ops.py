"""json.*: extract (JMESPath), merge, parse, repair."""

from __future__ import annotations

import re
from typing import Any

import jmespath
import orjson
from pydantic import BaseModel

from executors.registry import TaskContext, TaskFailed, executor


class ExtractParams(BaseModel):
    data: Any
    expression: str


@executor("json.extract", description="Evaluates a JMESPath expression over params.data; returns {value}.")
async def extract(params: ExtractParams, ctx: TaskContext) -> dict[str, Any]:
    try:
        compiled = jmespath.compile(params.expression)
    except jmespath.exceptions.ParseError as exc:
        raise TaskFailed("invalid_input", f"invalid JMESPath expression: {exc}") from exc
    return {"value": compiled.search(params.data)}


def deep_merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        merged = dict(base)
        for key, value in extra.items():
            merged[key] = deep_merge(merged[key], value) if key in merged else value
        return merged
    return extra


class MergeParams(BaseModel):
    objects: list[dict[str, Any]]


@executor("json.merge", description="Deep-merges params.objects left to right; returns {value}.")
async def merge(params: MergeParams, ctx: TaskContext) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for obj in params.objects:
        value = deep_merge(value, obj)
    return {"value": value}


class ParseParams(BaseModel):
    text: str


@executor("json.parse", description="Parses params.text as JSON; returns {value}.", repair="json.repair")
async def parse(params: ParseParams, ctx: TaskContext) -> dict[str, Any]:
    try:
        return {"value": orjson.loads(params.text)}
    except orjson.JSONDecodeError as exc:
        raise TaskFailed("invalid_input", f"params.text is not valid JSON: {exc}") from exc


def repair_json_text(text: str) -> str:
    """Fix what language models and hand-editing typically break: fences, quotes, trailing commas."""
    fixed = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", fixed, re.S)
    if fence:
        fixed = fence.group(1)
    start = min((i for i in (fixed.find("{"), fixed.find("[")) if i >= 0), default=0)
    fixed = fixed[start:]
    fixed = re.sub(r",\s*([}\]])", r"\1", fixed)
    fixed = re.sub(r"(?<![\w\"])'([^'\\]*)'", r'"\1"', fixed)
    fixed = re.sub(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*:", r'\1"\2":', fixed)
    fixed = fixed.replace("True", "true").replace("False", "false").replace("None", "null")
    return fixed


@executor("json.repair", description="Repairs almost-JSON text; returns {value, text}.")
async def repair(params: ParseParams, ctx: TaskContext) -> dict[str, Any]:
    fixed = repair_json_text(params.text)
    try:
        value = orjson.loads(fixed)
    except orjson.JSONDecodeError as exc:
        raise TaskFailed("permanent", f"could not repair the JSON: {exc}", {"attempted": fixed[:500]}) from exc
    return {"value": value, "text": orjson.dumps(value).decode()}
