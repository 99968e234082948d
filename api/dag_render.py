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


def _mermaid_id(name: str) -> str:
    return "t_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def to_mermaid(graph: dict[str, Any]) -> str:
    lines = ["flowchart TD"]
    for n in graph["nodes"]:
        marks = (" ✚" if n["inserted"] else "") + (" ↪" if n["rerouted"] else "")
        label = f"{n['id']}<br/><small>{n['type']} · {n['status']}{marks}</small>"
        lines.append(f'    {_mermaid_id(n["id"])}["{label}"]:::{n["status"]}')
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
        label = f"{n['id']}\\n{n['type']} · {n['status']}{marks}"
        lines.append(f'  {_dot_quote(n["id"])} [label="{label}", fillcolor={_DOT_COLOR.get(n["status"], "white")}];')
    for e in graph["edges"]:
        lines.append(f"  {_dot_quote(e['from'])} -> {_dot_quote(e['to'])};")
    lines.append("}")
    return "\n".join(lines) + "\n"
