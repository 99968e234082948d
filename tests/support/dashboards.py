"""Read the Grafana dashboards' queries, the way Grafana would send them to Prometheus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tests.support.stack import ROOT

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"

# Metrics announced by the Correction Mode work (DAG surgery, the policy and the trainer) that the
# dashboards and alerts already use. Until a service exports them, a panel built only on them has
# no data; the compose test reports such panels as pending instead of failing on them.
# Metrics announced for later work, whose panels may be reported instead of failed. Every metric
# the dashboards use is exported now, so none.
PENDING_METRICS: frozenset[str] = frozenset()

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

    def needs_trainer(self) -> bool:
        return 'job="trainer"' in self.expr and "|" not in self.expr


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
