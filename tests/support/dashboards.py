"""Read the Grafana dashboards' queries, the way Grafana would send them to Prometheus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tests.support.stack import ROOT

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"


_METRIC = re.compile(r"\b(dagsmith[_:][A-Za-z0-9_:]*)")
_HISTOGRAM_PARTS = re.compile(r"_(bucket|sum|count)$")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def label(self) -> str:
        return f"{self.dashboard} › {self.panel} [{self.ref}]"

    def metrics(self) -> set[str]:
        """The Dagsmith metric families the query reads (histogram suffixes removed)."""
        return {_HISTOGRAM_PARTS.sub("", m) for m in _METRIC.findall(self.expr)}


def panel_queries() -> list[PanelQuery]:
    queries: list[PanelQuery] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc = json.loads(path.read_text())
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                queries.append(PanelQuery(doc["title"], panel["title"], target["refId"], target["expr"]))
    return queries


def for_prometheus(expr: str, range_seconds: float) -> str:
    """Replace Grafana's interval variables as Grafana would for a 5 s scrape interval."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", f"{max(int(range_seconds), 60)}s")
    )
