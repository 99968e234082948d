"""What a change to a Workflow's ``spec`` means, decided without I/O.

Workflows are immutable once submitted: the store keeps the DAG it was given, and the controller
reconciles that. The one edit that means something is ``spec.cancel: true``. Anything else is
reported back (an Event and the ``SpecChangeRejected`` condition) and otherwise ignored; putting
the spec back as it was clears the condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_LISTED = 5


@dataclass(frozen=True)
class SpecDecision:
    cancel: bool  # spec.cancel is true: cancel the workflow
    differences: tuple[str, ...]  # paths that differ from the submitted spec (empty: none)

    @property
    def rejected(self) -> bool:
        return bool(self.differences)

    def message(self) -> str:
        if not self.differences:
            return "spec matches the submitted workflow"
        listed = ", ".join(self.differences[:MAX_LISTED])
        more = f" and {len(self.differences) - MAX_LISTED} more" if len(self.differences) > MAX_LISTED else ""
        return (
            f"workflows are immutable once submitted; ignored changes to {listed}{more}. "
            "Only spec.cancel: true takes effect; delete and re-create the resource to run a different spec."
        )


def differences(a: Any, b: Any, path: str = "spec") -> list[str]:
    """Paths where two JSON values differ (a missing key and a key set to null count as equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            if a.get(key) is None and b.get(key) is None:
                continue
            out += differences(a.get(key), b.get(key), f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [path]


def decide(submitted: Mapping[str, Any], current: Mapping[str, Any]) -> SpecDecision:
    """Compare the spec the store holds with the resource's spec now (both normalised)."""
    before = {k: v for k, v in submitted.items() if k != "cancel"}
    after = {k: v for k, v in current.items() if k != "cancel"}
    return SpecDecision(cancel=bool(current.get("cancel")), differences=tuple(differences(before, after)))
