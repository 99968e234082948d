"""A workflow's DAG as JSON, Mermaid or Graphviz DOT — pure functions over task rows."""

from __future__ import annotations

import re
from typing import Any

_STATUS_STYLE = {
    "pending": "fill:#eeeeee,stroke:#999999",
    "queued": "fill:#dbeafe,stroke:#3b82f6",
    "running": "fill:#bfdbfe,stroke:#1d4ed8",
    "succeeded": "fill:#bbf7d0,stroke:#15803d",
    "failed": "fill:#fecaca,stroke:#b91c1c",
    "skipped": "fill:#fef9c3,stroke:#a16207",
    "cancelled": "fill:#e5e7eb,stroke:#6b7280,stroke-dasharray:3",
}
_DOT_COLOR = {
    "pending": "gray90",
    "queued": "lightblue",
    "running": "skyblue",
    "succeeded": "palegreen",
    "failed": "salmon",
    "skipped": "khaki",
    "cancelled": "gray80",
}


def nodes_and_edges(rows: list[Any]) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    for r in rows:
        nodes.append(
            {
                "id": r.name,
                "task_id": r.id,
                "type": r.type,
                "status": r.status,
                "reward": r.reward,
                "attempt": r.attempt,
                "inserted": r.inserted_by_revision is not None,
                "rerouted": r.spec_type is not None and r.spec_type != r.type,
            }
        )
        edges.extend({"from": dep, "to": r.name} for dep in r.depends_on)
    return {"nodes": nodes, "edges": edges}


def structure_at(spec_tasks: list[dict[str, Any]], diffs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The DAG as it was after the given revision diffs (structure only: no statuses)."""
    from controller.surgery import replay

    submitted = {t["name"] for t in spec_tasks}
    # The type each task started with, inserted ones too (as the current view compares them).
    original = {t["name"]: t["type"] for t in spec_tasks}
    for diff in diffs:
        for op in diff:
            if op["op"] == "add":
                original.setdefault(op["task"]["name"], op["task"]["type"])
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    for t in replay(spec_tasks, diffs):
        nodes.append(
            {
                "id": t["name"],
                "type": t["type"],
                "inserted": t["name"] not in submitted,
                "rerouted": original.get(t["name"], t["type"]) != t["type"],
            }
        )
        edges.extend({"from": dep, "to": t["name"]} for dep in t.get("dependsOn", []))
    return {"nodes": nodes, "edges": edges}


def _mermaid_id(name: str) -> str:
    return "t_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def to_mermaid(graph: dict[str, Any]) -> str:
    lines = ["flowchart TD"]
    for n in graph["nodes"]:
        marks = (" ✚ inserted" if n["inserted"] else "") + (" ↪ rerouted" if n["rerouted"] else "")
        status = n.get("status")
        label = f"{n['id']}<br/><small>{n['type']}{' · ' + status if status else ''}{marks}</small>"
        lines.append(f'    {_mermaid_id(n["id"])}["{label}"]' + (f":::{status}" if status else ""))
    for e in graph["edges"]:
        lines.append(f"    {_mermaid_id(e['from'])} --> {_mermaid_id(e['to'])}")
    for status, style in _STATUS_STYLE.items():
        lines.append(f"    classDef {status} {style}")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: dict[str, Any], title: str = "workflow") -> str:
    lines = [
        f"digraph {_dot_quote(title)} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled"];',
    ]
    for n in graph["nodes"]:
        marks = (" (inserted)" if n["inserted"] else "") + (" (rerouted)" if n["rerouted"] else "")
        status = n.get("status")
        label = f"{n['id']}\\n{n['type']}{' · ' + status if status else ''}{marks}"
        color = _DOT_COLOR.get(status or "", "white")
        lines.append(f'  {_dot_quote(n["id"])} [label="{label}", fillcolor={color}];')
    for e in graph["edges"]:
        lines.append(f"  {_dot_quote(e['from'])} -> {_dot_quote(e['to'])};")
    lines.append("}")
    return "\n".join(lines) + "\n"
