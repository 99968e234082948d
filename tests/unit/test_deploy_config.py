"""The deployment files stay in step with the code: compose, .env.example, Prometheus, Grafana.

These need no Docker; tests/e2e/test_compose.py runs the same files for real.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from dagsmith.probe import probe
from dagsmith.settings import Settings
from tests.support.dashboards import panel_queries

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ONE_SHOT = {"migrate", "demo", "cli"}
DAGSMITH_SERVICES = {"migrate", "api", "controller", "evaluator", "executor", "trainer", "demo", "cli"}
# Settings docker-compose.yml sets itself (connections, the API's bind address and port, which
# Prometheus relies on) instead of passing them through from .env.
FIXED_SETTINGS = {
    "DAGSMITH_DATABASE_URL",
    "DAGSMITH_AMQP_URL",
    "DAGSMITH_API_HOST",
    "DAGSMITH_API_PORT",
    "DAGSMITH_API",
    "DAGSMITH_METRICS_PORT",
    "DAGSMITH_METRICS_HOST",  # every address (the default): Prometheus scrapes from another container
    "DAGSMITH_ADMIN_TOKEN",  # given to the API alone (compose requires it), not to every service
}
METRICS_PORTS = {"api": 8000, "controller": 9101, "evaluator": 9102, "executor": 9103, "trainer": 9104}


def setting_variables() -> set[str]:
    return {info.alias or f"DAGSMITH_{name.upper()}" for name, info in Settings.model_fields.items()}


def test_every_setting_is_passed_through_or_set_by_compose() -> None:
    env = SERVICES["controller"]["environment"]
    passed = {k for k, v in env.items() if v is None}
    assert setting_variables() - FIXED_SETTINGS <= passed, "add new settings to x-dagsmith in docker-compose.yml"
    assert {"DAGSMITH_DATABASE_URL", "DAGSMITH_AMQP_URL"} <= set(env)


def test_env_example_documents_every_setting_and_image() -> None:
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert setting_variables() - FIXED_SETTINGS <= named
    images = {"PYTHON_IMAGE", "POSTGRES_IMAGE", "RABBITMQ_IMAGE", "PROMETHEUS_IMAGE", "GRAFANA_IMAGE"}
    secrets = {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "DAGSMITH_ADMIN_TOKEN"}
    assert images | secrets <= named
    for secret in secrets:  # no secret has a value in the example
        assert re.search(rf"^{secret}=$", text, flags=re.MULTILINE), secret


def test_every_setting_in_env_example_is_valid_uncommented_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / ".env.example").read_text()
    known = setting_variables()
    found = set()
    for name, value in re.findall(r"^#?\s*(DAGSMITH_[A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE):
        if name in known:
            monkeypatch.setenv(name, re.sub(r"\s+#.*$", "", value).strip())  # Compose drops " # comments"
            found.add(name)
    assert "DAGSMITH_TRAINER_TIMESTEPS" in found
    Settings(_env_file=None)


def test_images_are_variables_with_official_defaults() -> None:
    raw = (ROOT / "docker-compose.yml").read_text()
    for variable, default in {
        "PYTHON_IMAGE": "python:3.11-slim",
        "POSTGRES_IMAGE": "postgres:",
        "RABBITMQ_IMAGE": "rabbitmq:",
        "PROMETHEUS_IMAGE": "prom/prometheus:",
        "GRAFANA_IMAGE": "grafana/grafana:",
    }.items():
        assert re.search(rf"\$\{{{variable}:-{re.escape(default)}", raw), variable
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "USER dagsmith" in dockerfile


def test_long_running_services_have_healthchecks_restart_policies_and_order() -> None:
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        assert "healthcheck" in service, name
        assert service.get("restart") == "unless-stopped", name
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "controller", "trainer"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert SERVICES[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert SERVICES["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_dagsmith_services_share_one_image_and_pick_the_service_by_command() -> None:
    for name in DAGSMITH_SERVICES:
        assert SERVICES[name]["image"] == "${DAGSMITH_IMAGE:-dagsmith:local}", name
    assert SERVICES["trainer"]["command"] == ["trainer", "serve"]
    assert SERVICES["executor"]["command"][0] == "executor"
    assert "container_name" not in SERVICES["executor"]  # or it could not scale


def test_state_lives_in_named_volumes_and_only_ui_ports_are_published() -> None:
    assert set(COMPOSE["volumes"]) == {"postgres-data", "rabbitmq-data", "prometheus-data", "grafana-data"}
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    assert "ports" not in SERVICES["postgres"]
    assert all(not p.endswith(":5672") for p in SERVICES["rabbitmq"].get("ports", []))


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for service, port in METRICS_PORTS.items():
        (sd,) = jobs[service]["dns_sd_configs"]  # DNS: every container of a scaled service
        assert sd["names"] == [service] and sd["port"] == port and sd["type"] == "A"
    for service in METRICS_PORTS:
        probe_url = " ".join(SERVICES[service]["healthcheck"]["test"])
        assert f":{METRICS_PORTS[service]}/" in probe_url, service


def test_default_metrics_ports_match_the_code() -> None:
    from controller.service import DEFAULT_METRICS_PORT as controller_port
    from evaluator.service import DEFAULT_METRICS_PORT as evaluator_port
    from executors.runtime import DEFAULT_METRICS_PORT as executor_port

    assert (controller_port, evaluator_port, executor_port) == (9101, 9102, 9103)


def test_alert_rules_cover_what_the_issue_asks_for() -> None:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml").read_text())["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    for needed in (
        "DagsmithWorkflowFailureRateHigh",
        "DagsmithWorkflowsStuck",
        "DagsmithQueueBacklogGrowing",
        "DagsmithExecutorHeartbeatLost",
        "DagsmithPolicyGateFailed",
    ):
        assert needed in alerts
        assert alerts[needed]["annotations"]["summary"]


def test_every_alert_says_what_to_do() -> None:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml").read_text())["groups"]
    for rule in (r for group in groups for r in group["rules"] if "alert" in r):
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]


def test_every_alert_has_a_promtool_test_case() -> None:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml").read_text())["groups"]
    alerts = {r["alert"] for group in groups for r in group["rules"] if "alert" in r}
    tests = yaml.safe_load((ROOT / "deploy" / "prometheus" / "tests" / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    firing = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert tested <= alerts, "alerts_test.yml names alerts that do not exist"
    assert alerts - {"DagsmithDeadLetters"} <= firing, "add a promtool case in which the alert fires"


def test_alerts_read_no_recorded_series_and_never_sum_the_controllers_gauges() -> None:
    """Rule groups are evaluated concurrently: an alert reading another group's recording lags
    it at random. Every controller exports the same global gauges, so a sum counts them twice."""
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml").read_text())["groups"]
    for rule in (r for group in groups for r in group["rules"] if "alert" in r):
        assert "dagsmith:" not in rule["expr"], rule["alert"]
    recording = (ROOT / "deploy" / "prometheus" / "rules" / "recording.yml").read_text()
    alerts = (ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml").read_text()
    exprs = [recording, alerts, *(q.expr for q in panel_queries())]
    for gauge in (
        "dagsmith_workflows",
        "dagsmith_queue_depth",
        "dagsmith_executors_alive",
        "dagsmith_executors_silent",
    ):
        for expr in exprs:
            summed = rf"\bsum\s*((by|without)\s*\([^)]*\)\s*)?\(\s*(label_replace\(\s*)?(delta\(\s*)?{gauge}\b"
            assert not re.search(summed, expr), (gauge, expr)


def test_the_series_the_alerts_count_on_exist_from_the_start() -> None:
    """A labelled counter's series first made by inc() starts at 1, which increase() never sees;
    the shadow agreement is NaN, not 0%, before any shadow decision. A fresh interpreter: other
    tests change these metrics."""
    code = (
        "import prometheus_client, controller.correct, trainer.service; "
        "print(prometheus_client.generate_latest().decode())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = set(done.stdout.splitlines())
    for line in (
        'dagsmith_policy_gate_total{result="passed"} 0.0',
        'dagsmith_policy_gate_total{result="failed"} 0.0',
        'dagsmith_trainer_runs_total{outcome="activated"} 0.0',
        'dagsmith_trainer_runs_total{outcome="registered"} 0.0',
        'dagsmith_trainer_runs_total{outcome="error"} 0.0',
        "dagsmith_policy_shadow_agreement_ratio NaN",
    ):
        assert line in lines, line


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "deploy" / "grafana" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_what_the_generator_makes() -> None:
    assert load_generator().main(["--check"]) == 0, "run: python deploy/grafana/generate.py"


def test_every_panel_queries_prometheus_through_the_datasource_variable() -> None:
    for path in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        doc = json.loads(path.read_text())
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)), path.name
        assert doc["templating"]["list"][0]["name"] == "datasource"
        for panel in doc["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["targets"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_every_latency_query_is_shown_in_seconds() -> None:
    """A panel may mix a latency with counts: then a field override gives the latency its unit."""
    for path in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] == "row":
                continue
            config = panel["fieldConfig"]
            units = {
                override["matcher"]["options"]: prop["value"]
                for override in config["overrides"]
                if override["matcher"]["id"] == "byFrameRefID"
                for prop in override["properties"]
                if prop["id"] == "unit"
            }
            for target in panel["targets"]:
                if re.search(r"histogram_quantile\(.*_seconds_bucket", target["expr"]):
                    assert units.get(target["refId"], config["defaults"]["unit"]) == "s", (panel["title"], target)


def test_dashboards_cover_what_the_issue_asks_for() -> None:
    used = set().union(*(q.metrics() for q in panel_queries()))
    for metric in (
        "dagsmith_workflows_finished_total",
        "dagsmith_tasks_completed_total",
        "dagsmith_dispatch_to_start_seconds",
        "dagsmith_task_run_seconds",
        "dagsmith_finish_to_successor_dispatch_seconds",
        "dagsmith:queue_depth:by_capability",
        "dagsmith_executors_alive",
        "dagsmith_executor_running",
        "dagsmith_task_reward",
        "dagsmith_surgeries_total",
        "dagsmith_policy_decisions_total",
        "dagsmith_policy_shadow_agreement_ratio",
        "dagsmith_policy_active_version",
        "dagsmith_policy_gate_total",
    ):
        assert metric in used, metric


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((prov / "dashboards" / "dagsmith.yml").read_text())["providers"]
    mounts = SERVICES["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_probe_is_healthy_only_on_200(http_server: str) -> None:
    assert probe(f"{http_server}/ok")[0]
    ok, seen = probe(f"{http_server}/not-ready")
    assert not ok and "503" in seen
    ok, _ = probe("http://127.0.0.1:9/", timeout=1)
    assert not ok
