"""text.*: template, upper, lower, split, word_count, keywords, clean."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Any

from pydantic import BaseModel, Field

from executors.registry import TaskContext, executor

_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*", re.UNICODE)
_STOPWORD_TEXT = """
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


class TextParams(BaseModel):
    text: str


class TemplateParams(BaseModel):
    template: str
    values: dict[str, Any] = Field(default_factory=dict)


@executor("text.template", description="Fills ${name} placeholders from params.values; returns {text}.")
async def template(params: TemplateParams, ctx: TaskContext) -> dict[str, Any]:
    # Workflow-level {{ ... }} references were already resolved by the controller.
    return {"text": string.Template(params.template).safe_substitute(params.values)}


@executor("text.upper", description="Upper-cases params.text.", repair="text.clean")
async def upper(params: TextParams, ctx: TaskContext) -> dict[str, Any]:
    return {"text": params.text.upper()}


@executor("text.lower", description="Lower-cases params.text.", repair="text.clean")
async def lower(params: TextParams, ctx: TaskContext) -> dict[str, Any]:
    return {"text": params.text.lower()}


class SplitParams(BaseModel):
    text: str
    sep: str | None = None
    maxsplit: int = -1


@executor("text.split", description="Splits params.text on params.sep (whitespace by default).")
async def split(params: SplitParams, ctx: TaskContext) -> dict[str, Any]:
    parts = params.text.split(params.sep, params.maxsplit)
    return {"parts": parts, "count": len(parts)}


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@executor("text.word_count", description="Counts words in params.text.")
async def word_count(params: TextParams, ctx: TaskContext) -> dict[str, Any]:
    found = words(params.text)
    return {"words": len(found), "unique": len(set(found))}


class KeywordParams(BaseModel):
    text: str
    top: int = Field(5, ge=1, le=100)


@executor("text.keywords", description="The most frequent non-stopwords of params.text.")
async def keywords(params: KeywordParams, ctx: TaskContext) -> dict[str, Any]:
    counts = Counter(w for w in words(params.text) if w not in _STOPWORDS and len(w) > 2)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: params.top]
    return {"keywords": [w for w, _ in ranked], "counts": dict(ranked)}


@executor("text.clean", description="Normalises unicode, drops control characters, collapses whitespace.")
async def clean(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    raw = params.get("text", "")
    text = raw if isinstance(raw, str) else str(raw)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return {"text": re.sub(r"\s+", " ", text).strip()}
