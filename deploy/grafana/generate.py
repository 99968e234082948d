"""Write the Grafana dashboards in deploy/grafana/dashboards/ from the panel lists below, and
the same files into the Helm chart (charts/dagsmith/dashboards/: a chart cannot read files
outside its folder).

    python deploy/grafana/generate.py          # rewrite the JSON files
    python deploy/grafana/generate.py --check  # exit 1 if they are not what this file makes

The JSON is what Grafana loads (compose provisioning, or a ConfigMap labelled for the Grafana
sidecar in Kubernetes); this file is where panels are edited. Every query goes through the
``datasource`` variable, so the dashboards work with whatever Prometheus data source a Grafana
has. tests/e2e/test_compose.py asks Prometheus every query below after a demo run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUTS = [ROOT / "deploy" / "grafana" / "dashboards", ROOT / "charts" / "dagsmith" / "dashboards"]
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""
    unit: str = ""  # when not the panel's: a field override for this query's series


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Q, ...]
    kind: str = "timeseries"  # timeseries | stat | heatmap | bargauge
    unit: str = "short"
    description: str = ""
    width: int = 12
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def quantiles(metric: str, by: str = "", unit: str = "") -> tuple[Q, ...]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Q(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            f"p{int(q * 100)}{suffix}",
            unit,
        )
        for q in (0.5, 0.95, 0.99)
    )


def heatmap(title: str, metric: str, description: str, unit: str = "s") -> Panel:
    return Panel(
        title,
        (Q(f"sum by (le) (increase({metric}_bucket[{RATE}]))", "{{le}}"),),
        kind="heatmap",
        unit=unit,
        description=description,
        width=8,
    )


# The controller's gauges (dagsmith_workflows, dagsmith_queue_depth, dagsmith_executors_alive,
# dagsmith_executors_silent) hold global values read from Postgres and RabbitMQ, and every
# controller exports them: max over the controllers, never a sum.
OVERVIEW = (
    Row(
        "Throughput and outcomes",
        (
            Panel(
                "Workflows finished per second, by status",
                (Q(f"sum by (status) (rate(dagsmith_workflows_finished_total[{RATE}]))", "{{status}}"),),
                unit="ops",
                stack=True,
                width=8,
            ),
            Panel(
                "Workflows by status",
                (Q("max by (status) (dagsmith_workflows)", "{{status}}"),),
                kind="bargauge",
                width=8,
            ),
            Panel(
                "Workflow failure ratio (5m)",
                (Q("dagsmith:workflow_failure_ratio:rate5m", "failed / finished"),),
                kind="stat",
                unit="percentunit",
                width=8,
                description="Share of the workflows finished in the last 5 minutes that failed (recording rule).",
            ),
            Panel(
                "Task attempts completed per second, by outcome",
                (Q(f"sum by (outcome) (rate(dagsmith_tasks_completed_total[{RATE}]))", "{{outcome}}"),),
                unit="ops",
                stack=True,
                width=8,
                description="Evaluated attempts the controller applied: succeeded, retried or failed.",
            ),
            Panel(
                "Task attempts dispatched per second, by type",
                (Q(f"sum by (type) (rate(dagsmith_tasks_dispatched_total[{RATE}]))", "{{type}}"),),
                unit="ops",
                stack=True,
                width=8,
            ),
            Panel(
                "API: submissions per second and p95 latency",
                (
                    Q(
                        f"sum by (source) (rate(dagsmith_api_workflows_submitted_total[{RATE}]))",
                        "submitted ({{source}})",
                    ),
                    Q(
                        "histogram_quantile(0.95, sum by (le, route) "
                        f"(rate(dagsmith_api_request_seconds_bucket[{RATE}])))",
                        "p95 {{route}}",
                        unit="s",
                    ),
                ),
                unit="ops",
                width=8,
                description="Submissions per second and the 95th percentile of request time (seconds) by route.",
            ),
        ),
    ),
    Row(
        "Task latency",
        (
            heatmap(
                "Queue wait (dispatch → start)",
                "dagsmith_dispatch_to_start_seconds",
                "From publishing a task to an executor starting it.",
            ),
            heatmap(
                "Run time",
                "dagsmith_task_run_seconds",
                "Executor run time of task attempts.",
            ),
            heatmap(
                "Finish → successor dispatch",
                "dagsmith_finish_to_successor_dispatch_seconds",
                "From a task finishing to its newly ready successor being published.",
            ),
            Panel("Queue wait quantiles", quantiles("dagsmith_dispatch_to_start_seconds"), unit="s", width=8),
            Panel("Run time p95 by type", (quantiles("dagsmith_task_run_seconds", "type")[1],), unit="s", width=8),
            Panel(
                "Finish → successor dispatch quantiles",
                quantiles("dagsmith_finish_to_successor_dispatch_seconds"),
                unit="s",
                width=8,
            ),
            Panel(
                "Reconciliation rounds",
                (
                    *quantiles("dagsmith_reconcile_duration_seconds", unit="s")[1:2],
                    Q(
                        f"sum(rate(dagsmith_reconcile_batch_size_sum[{RATE}])) "
                        f"/ sum(rate(dagsmith_reconcile_batch_size_count[{RATE}]))",
                        "messages per round",
                    ),
                ),
                width=12,
                description="p95 time of one round (one transaction, seconds) and the mean messages it applied.",
            ),
        ),
    ),
    Row(
        "Queues and executors",
        (
            Panel(
                "Queue depth per capability",
                (Q("dagsmith:queue_depth:by_capability", "{{capability}}"),),
                stack=True,
                description="Tasks ready in each task type's RabbitMQ queue (read by the controller every 5 s).",
            ),
            Panel(
                "Internal queues",
                (Q('max by (queue) (dagsmith_queue_depth{queue!~".+\\\\.task\\\\..+"})', "{{queue}}"),),
                description="Results, evaluations, executor events and dead letters waiting in RabbitMQ.",
            ),
            Panel(
                "Live executors per capability",
                (Q("max by (type) (dagsmith_executors_alive)", "{{type}}"),),
                kind="bargauge",
                width=8,
                description="Executors that sent a heartbeat in the last three heartbeat intervals.",
            ),
            Panel(
                "Executor processes",
                (
                    Q('count(up{job="executor"} == 1)', "answering"),
                    Q('count(up{job="executor"} == 0) or vector(0)', "not answering"),
                    Q("sum(dagsmith_executor_running)", "tasks running"),
                    Q("max(dagsmith_executors_silent)", "silent, no goodbye"),
                ),
                kind="stat",
                width=8,
            ),
            Panel(
                "Tasks run per executor",
                (
                    Q(
                        f"sum by (instance, outcome) (rate(dagsmith_executor_tasks_total[{RATE}]))",
                        "{{instance}} {{outcome}}",
                    ),
                ),
                unit="ops",
                width=8,
            ),
            Panel(
                "Lost and poisoned tasks",
                (
                    Q(f"sum(rate(dagsmith_leases_expired_total[{RATE}]))", "leases expired (executor lost)"),
                    Q(f"sum(rate(dagsmith_dead_letters_total[{RATE}]))", "dead-lettered"),
                    Q(f"sum(rate(dagsmith_task_redrives_total[{RATE}]))", "sent again (last delivery never started)"),
                ),
                unit="ops",
                description="Running tasks whose executor stopped heartbeating; task messages dead-lettered at the "
                "delivery limit (poison when their last delivery started), and those sent again because it never did.",
            ),
            Panel(
                "Services up",
                (Q('up{job=~"api|controller|evaluator|executor|trainer"}', "{{job}} {{instance}}"),),
                kind="stat",
                extra={"options": {"colorMode": "background", "textMode": "name"}},
                description="1 when Prometheus can scrape the service.",
            ),
        ),
    ),
    Row(
        "Evaluation and reward",
        (
            Panel(
                "Reward over time by task type (median and 10th percentile)",
                (
                    Q(
                        f"histogram_quantile(0.5, sum by (le, type) (rate(dagsmith_task_reward_bucket[{RATE}])))",
                        "median {{type}}",
                    ),
                    Q(
                        f"histogram_quantile(0.1, sum by (le, type) (rate(dagsmith_task_reward_bucket[{RATE}])))",
                        "p10 {{type}}",
                    ),
                ),
                width=8,
                description="The evaluator's reward (formula in evaluator/reward.py), from its histogram buckets: "
                "rewards can be negative, so the histogram has no _sum and a mean is not available.",
            ),
            heatmap("Reward distribution", "dagsmith_task_reward", "Rewards given per bucket.", unit="short"),
            Panel(
                "Evaluations per second, by verdict",
                (Q(f"sum by (verdict) (rate(dagsmith_evaluations_total[{RATE}]))", "{{verdict}}"),),
                unit="ops",
                stack=True,
                width=8,
            ),
        ),
    ),
)

CORRECTION = (
    Row(
        "DAG surgery",
        (
            Panel(
                "Surgeries per second, by action and reason",
                (
                    Q(
                        f"sum by (action, reason) (rate(dagsmith_surgeries_total[{RATE}]))",
                        "{{action}} · {{reason}}",
                    ),
                ),
                unit="ops",
                stack=True,
                width=16,
            ),
            Panel(
                "Surgeries in range, by action",
                (Q("sum by (action) (increase(dagsmith_surgeries_total[$__range]))", "{{action}}"),),
                kind="bargauge",
                width=8,
            ),
        ),
    ),
    Row(
        "Correction policy",
        (
            Panel(
                "Active policy version",
                (Q("max by (version) (dagsmith_policy_active_version) == 1", "{{version}}"),),
                kind="stat",
                width=6,
                extra={"options": {"textMode": "name", "colorMode": "background"}},
            ),
            Panel(
                "Shadow agreement",
                # NaN until a controller has made a shadow decision: no data, not 0%.
                (Q("dagsmith_policy_shadow_agreement_ratio >= 0", "{{instance}}"),),
                kind="stat",
                unit="percentunit",
                width=6,
                description="Share of shadow-mode decisions on which the learned policy agreed with the rules, "
                "per controller since it started (no data: no shadow decision yet).",
            ),
            Panel(
                "Policy decisions per second, by action and mode",
                (
                    Q(
                        f"sum by (action, mode, policy_version) (rate(dagsmith_policy_decisions_total[{RATE}]))",
                        "{{action}} ({{mode}}, {{policy_version}})",
                    ),
                ),
                unit="ops",
                stack=True,
            ),
            Panel(
                "Promotion gate results",
                (Q("sum by (result) (increase(dagsmith_policy_gate_total[$__range]))", "{{result}}"),),
                kind="bargauge",
                description="Trained policies that passed or failed the gate before promotion.",
            ),
            Panel(
                "Trainer up",
                (Q('up{job="trainer"}', "{{instance}}"),),
                kind="stat",
                extra={"options": {"colorMode": "background"}},
            ),
        ),
    ),
)


def panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DS, "expr": q.expr, "legendFormat": q.legend or "__auto"}
        | ({"format": "heatmap"} if panel.kind == "heatmap" else {})
        for i, q in enumerate(panel.queries)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit}
    overrides = [
        {"matcher": {"id": "byFrameRefID", "options": target["refId"]}, "properties": [{"id": "unit", "value": q.unit}]}
        for target, q in zip(targets, panel.queries, strict=True)
        if q.unit and q.unit != panel.unit
    ]
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 20 if panel.stack else 0,
            "stacking": {"mode": "normal" if panel.stack else "none"},
            "showPoints": "never",
        }
        options = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif panel.kind == "heatmap":
        options = {
            "calculate": False,
            "yAxis": {"unit": panel.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges"},
        }
    elif panel.kind in ("stat", "bargauge"):
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    options |= panel.extra.get("options", {})
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": options,
    }


def dashboard(uid: str, title: str, rows: tuple[Row, ...], links: list[str]) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    return {
        "uid": uid,
        "title": title,
        "tags": ["dagsmith"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "links": [
            {
                "type": "dashboards",
                "tags": ["dagsmith"],
                "title": "Dagsmith",
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ]
        if links
        else [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


DASHBOARDS = {
    "dagsmith-overview.json": dashboard("dagsmith-overview", "Dagsmith — overview", OVERVIEW, ["dagsmith"]),
    "dagsmith-correction.json": dashboard(
        "dagsmith-correction", "Dagsmith — correction and learning", CORRECTION, ["dagsmith"]
    ),
}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, doc in DASHBOARDS.items():
        text = render(doc)
        for out in OUTS:
            path = out / name
            if "--check" in argv:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(ROOT)))
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python deploy/grafana/generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
