"""The Helm chart, offline: it renders and lints with Helm's own library, every manifest validates
against the Kubernetes schemas, and it installs what the operator needs and nothing more.

Tools: ``helm-python-sdk`` (Helm v4's Go SDK behind a C ABI: the same template engine, values
schema check and linter as the ``helm`` binary) and ``kubernetes-validate --strict`` (the
Kubernetes OpenAPI schemas, unknown fields rejected).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.operator import crd
from dagsmith.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dagsmith"
KUBE_VERSION = "1.33.0"
VALUES = {path.stem: yaml.safe_load(path.read_text()) for path in sorted((CHART / "ci").glob("*-values.yaml"))}

# Custom resources kubernetes-validate has no schema for: the fields the chart relies on.
OTHER_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"]},
                    "endpoints": {"type": "array", "items": {"type": "object", "required": ["port"]}},
                },
            }
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                    },
                                }
                            },
                        },
                    }
                },
            }
        },
    },
    "ScaledObject": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"]},
                    "minReplicaCount": {"type": "integer"},
                    "maxReplicaCount": {"type": "integer"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "rabbitmq"},
                                "metadata": {
                                    "type": "object",
                                    "required": ["queueName", "mode", "value", "hostFromEnv"],
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            }
        },
    },
}


def render(
    values: dict[str, Any], chart: Path = CHART, name: str = "dagsmith", namespace: str = "dagsmith"
) -> list[dict[str, Any]]:
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values, name=name, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def chart_crds() -> Iterator[dict[str, Any]]:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", sorted(VALUES))
def test_the_chart_lints(name: str) -> None:
    report = helm.lint(CHART, VALUES[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1 and problems == []


def validate(docs: list[dict[str, Any]]) -> None:
    """Every manifest against the Kubernetes schemas (custom resources: their CRDs or OTHER_SCHEMAS)."""
    crd_schemas = {
        c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for c in chart_crds()
    }
    assert docs
    for doc in docs:
        kind = doc["kind"]
        if kind in crd_schemas:
            jsonschema.validate(doc, crd_schemas[kind])
        elif kind in OTHER_SCHEMAS:
            jsonschema.validate(doc, OTHER_SCHEMAS[kind])
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    validate(render(VALUES[name]))


def test_the_crds_validate_and_the_workflow_crd_is_current() -> None:
    for doc in chart_crds():
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert (CHART / "crds" / "workflows.yaml").read_text() == crd.render()


def test_defaults_ask_for_the_connections_and_the_values_schema_checks_types() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"set database\.url or database\.existingSecret"):
        render({})
    with pytest.raises(helm.HelmValuesError, match="api/replicas"):
        render({**VALUES["external-values"], "api": {"replicas": "two"}})
    with pytest.raises(helm.HelmValuesError):
        render({**VALUES["external-values"], "settings": {"LOG_LEVEL": "DEBUG"}})  # not DAGSMITH_*


def test_components_probes_and_secrets() -> None:
    docs = render(VALUES["external-values"])
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    assert set(deployments) == {
        "dagsmith-api",
        "dagsmith-controller",
        "dagsmith-evaluator",
        "dagsmith-executor-text",
        "dagsmith-executor-http",
        "dagsmith-trainer",
    }
    api = deployments["dagsmith-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["ports"][0]["containerPort"] == 8000
    controller_pod = deployments["dagsmith-controller"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in controller_pod["containers"]}
    assert containers["controller"]["ports"][0]["containerPort"] == 9101
    assert containers["operator"]["args"][:2] == ["operator", "--all-namespaces"]
    assert containers["operator"]["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert controller_pod["serviceAccountName"] == "dagsmith-operator"
    ports = {
        name: d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        for name, d in deployments.items()
    }
    assert ports["dagsmith-evaluator"] == 9102 and ports["dagsmith-executor-text"] == 9103
    assert ports["dagsmith-trainer"] == 9104
    scraped = {
        s["metadata"]["name"] for s in of_kind(docs, "Service") if s["metadata"]["labels"].get("dagsmith.io/metrics")
    }
    assert "dagsmith-trainer-metrics" in scraped and "dagsmith-evaluator-metrics" in scraped
    # Each container gets the connections it uses: executors and the evaluator only the broker,
    # the admin token only the API.
    uses_postgres = {"api", "controller", "operator", "trainer"}
    for name, d in deployments.items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"], f"{name}/{c['name']} has no resource requests"
            assert c.get("livenessProbe"), f"{name}/{c['name']} has no liveness probe"
            env = {
                e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
                for e in c["env"]
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            expected = {"DAGSMITH_AMQP_URL": "dagsmith-rabbitmq"}
            if c["name"] in uses_postgres:
                expected["DAGSMITH_DATABASE_URL"] = "dagsmith-connections"
            if c["name"] == "api":
                expected["DAGSMITH_ADMIN_TOKEN"] = "dagsmith-auth"
            assert env == expected, f"{name}/{c['name']}"
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    [secret] = of_kind(docs, "Secret")
    assert set(secret["stringData"]) == {"DAGSMITH_DATABASE_URL"}  # RabbitMQ's comes from an existing Secret
    http_args = deployments["dagsmith-executor-http"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--types=http.request" in http_args and "--allow-host=api.example.com" in http_args


TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where kopf's login reads the token


def test_only_the_operator_container_gets_a_token() -> None:
    """The controller pod runs under the operator's service account, but the controller beside the
    operator never talks to the Kubernetes API: the token is mounted into the operator's container
    alone, with what the default mount has besides (the CA, the namespace), where kopf reads them."""
    docs = render(VALUES["external-values"])
    pod = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "dagsmith-controller")
    spec = pod["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "dagsmith-operator" and spec["automountServiceAccountToken"] is False
    mounts = {c["name"]: {m["mountPath"]: m for m in c["volumeMounts"]} for c in spec["containers"]}
    assert TOKEN_DIR not in mounts["controller"]
    mount = mounts["operator"][TOKEN_DIR]
    assert mount["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    assert [next(iter(source)) for source in sources] == ["serviceAccountToken", "configMap", "downwardAPI"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert sources[1]["configMap"] == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    [namespace] = sources[2]["downwardAPI"]["items"]
    assert namespace["path"] == "namespace" and namespace["fieldRef"]["fieldPath"] == "metadata.namespace"
    accounts = {a["metadata"]["name"]: a for a in of_kind(docs, "ServiceAccount")}
    assert {a["automountServiceAccountToken"] for a in accounts.values()} == {False}

    # Without the operator, no pod mounts a token at all.
    docs = render({**VALUES["external-values"], "operator": {"enabled": False}})
    for deployment in of_kind(docs, "Deployment"):
        pod_spec = deployment["spec"]["template"]["spec"]
        assert pod_spec["automountServiceAccountToken"] is False
        assert "projected" not in str(pod_spec["volumes"])


def test_keda_scales_a_pool_on_its_task_queues() -> None:
    docs = render(VALUES["external-values"])
    [scaled] = of_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "dagsmith-executor-text"
    queues = [t["metadata"]["queueName"] for t in scaled["spec"]["triggers"]]
    assert queues == ["dagsmith.task.text.upper", "dagsmith.task.text.template", "dagsmith.task.json.extract"]
    text = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "dagsmith-executor-text")
    assert "replicas" not in text["spec"]  # KEDA owns the replica count


def test_rbac_is_what_kopf_and_the_operator_need() -> None:
    docs = render(VALUES["external-values"])
    [role] = of_kind(docs, "ClusterRole")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    # kopf 1.45 (read in its source): it lists, watches and patches, and never gets one object;
    # serving every namespace, it does not look at namespaces at all.
    assert rules == {
        (("apiextensions.k8s.io",), ("customresourcedefinitions",)): {"list", "watch"},
        (("kopf.dev",), ("clusterkopfpeerings",)): {"list", "watch", "patch"},
        (("dagsmith.io",), ("workflows",)): {"list", "watch", "patch"},
        (("dagsmith.io",), ("workflows/status",)): {"patch"},
        (("",), ("events",)): {"create"},
    }
    assert of_kind(docs, "Role") == []
    [peering] = of_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "dagsmith-dagsmith"
    assert f"--peering={peering['metadata']['name']}" in operator_args(docs)


def test_releases_do_not_share_a_peering_object() -> None:
    """A ClusterKopfPeering is cluster-wide: two releases serving all namespaces would otherwise
    elect one active operator between them, and the other release's Workflows would go unserved."""
    names = set()
    for release, namespace in [("dagsmith", "team-a"), ("dagsmith", "team-b"), ("other", "team-a")]:
        docs = render(VALUES["external-values"], name=release, namespace=namespace)
        [peering] = of_kind(docs, "ClusterKopfPeering")
        assert f"--peering={peering['metadata']['name']}" in operator_args(docs)
        names.add(peering["metadata"]["name"])
    assert len(names) == 3
    docs = render(VALUES["demo-values"])
    assert {p["metadata"]["name"] for p in of_kind(docs, "KopfPeering")} == {"dagsmith-dagsmith"}
    assert "--peering=dagsmith-dagsmith" in operator_args(docs)


def operator_args(docs: list[dict[str, Any]]) -> list[str]:
    return next(
        c["args"]
        for d in of_kind(docs, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["name"] == "operator"
    )


def test_an_operator_limited_to_namespaces_gets_roles_there() -> None:
    docs = render(VALUES["demo-values"])
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["default", "team-a"]
    [cluster_role] = of_kind(docs, "ClusterRole")
    assert {r["resources"][0] for r in cluster_role["rules"]} == {"customresourcedefinitions", "namespaces"}
    # Listed namespaces: kopf lists and watches namespaces to notice one created later.
    assert {r["resources"][0]: set(r["verbs"]) for r in cluster_role["rules"]}["namespaces"] == {"list", "watch"}
    for role in roles:
        rules = {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in role["rules"]}
        assert rules == {
            ("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"},
            ("dagsmith.io", "workflows"): {"list", "watch", "patch"},
            ("dagsmith.io", "workflows/status"): {"patch"},
            ("", "events"): {"create"},
        }
    assert sorted(p["metadata"]["namespace"] for p in of_kind(docs, "KopfPeering")) == ["default", "team-a"]
    args = operator_args(docs)
    assert "--namespace=default" in args and "--namespace=team-a" in args
    assert {s["metadata"]["name"] for s in of_kind(docs, "StatefulSet")} == {"dagsmith-postgres", "dagsmith-rabbitmq"}
    secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    assert "@dagsmith-postgres:5432/" in secrets["dagsmith-connections"]["stringData"]["DAGSMITH_DATABASE_URL"]
    assert not [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "dagsmith-trainer"]


def test_an_admin_token_is_made_when_none_is_given() -> None:
    """With no auth.existingSecret the chart makes a random bootstrap token (auth stays on, and
    someone can get in); the API reads the token from whichever Secret holds it."""
    docs = render(VALUES["demo-values"])
    made = next(s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "dagsmith-admin-token")
    token = made["stringData"]["DAGSMITH_ADMIN_TOKEN"]
    assert token.startswith("dgs_") and len(token) == 47
    assert made["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert render(VALUES["demo-values"]) != docs  # random per render offline (an install looks it up)

    def token_refs(docs: list[dict[str, Any]]) -> set[str]:
        return {
            env["valueFrom"]["secretKeyRef"]["name"]
            for d in of_kind(docs, "Deployment")
            for c in d["spec"]["template"]["spec"]["containers"]
            for env in c.get("env", [])
            if env["name"] == "DAGSMITH_ADMIN_TOKEN"
        }

    assert token_refs(docs) == {"dagsmith-admin-token"}
    own = {**VALUES["demo-values"], "auth": {"existingSecret": "my-token"}}
    docs = render(own)
    assert not [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "dagsmith-admin-token"]
    assert token_refs(docs) == {"my-token"}


def test_dashboards_are_shipped_when_there_are_any(tmp_path: Path) -> None:
    values = VALUES["external-values"]
    assert of_kind(render(values), "ConfigMap")  # settings only when the folder has no JSON
    chart = tmp_path / "dagsmith"
    shutil.copytree(CHART, chart)
    for old in (chart / "dashboards").glob("*.json"):
        old.unlink()
    assert [c["metadata"]["name"] for c in of_kind(render(values, chart), "ConfigMap")] == ["dagsmith-settings"]
    (chart / "dashboards" / "overview.json").write_text('{"title": "Dagsmith"}')
    maps = {c["metadata"]["name"]: c for c in of_kind(render(values, chart), "ConfigMap")}
    board = maps["dagsmith-dashboards"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["data"] == {"overview.json": '{"title": "Dagsmith"}'}


def test_the_chart_ships_the_dashboards_compose_provisions() -> None:
    values = {**VALUES["external-values"], "grafana": {"dashboards": {"enabled": True}}}
    (board,) = [c for c in of_kind(render(values), "ConfigMap") if c["metadata"]["name"] == "dagsmith-dashboards"]
    compose = ROOT / "deploy" / "grafana" / "dashboards"
    shipped = {path.name: path.read_text().rstrip("\n") for path in compose.glob("*.json")}
    assert len(shipped) >= 2 and board["data"] == shipped


def relabel(rule: dict[str, Any], value: str) -> str | None:
    """One Prometheus ``replace`` relabeling of one source value (None: the regex does not match)."""
    match = re.fullmatch(rule["regex"], value)  # Prometheus anchors the regex at both ends
    if match is None:
        return None
    return re.sub(r"\$\{(\d+)\}", lambda ref: match.group(int(ref[1])) or "", rule["replacement"])


def test_the_service_monitor_gives_targets_the_job_names_compose_uses() -> None:
    """Dashboards and alerts select targets by Compose's job names (``up{job="executor"}``);
    left alone, the operator would name the jobs after the Services (dagsmith-executor-text-metrics)."""
    compose = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped = [job for job in compose["scrape_configs"] if "dns_sd_configs" in job]  # the Dagsmith services
    compose_jobs = {job["job_name"]: {job["dns_sd_configs"][0]["port"]} for job in scraped}
    docs = render(VALUES["external-values"])
    [monitor] = of_kind(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    jobs: dict[str, set[int]] = {}
    for endpoint in monitor["spec"]["endpoints"]:
        [rule] = endpoint["relabelings"]
        assert rule["targetLabel"] == "job"
        assert rule["sourceLabels"] == ["__meta_kubernetes_service_label_app_kubernetes_io_component"]
        for service in of_kind(docs, "Service"):
            labels = service["metadata"]["labels"]
            ports = [p["port"] for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            if selector.items() <= labels.items() and ports:
                job = relabel(rule, labels["app.kubernetes.io/component"])
                assert job, service["metadata"]["name"]
                jobs.setdefault(job, set()).update(ports)
    assert jobs == compose_jobs  # two executor pools, one job "executor"


def test_the_chart_ships_the_rules_compose_loads() -> None:
    compose = ROOT / "deploy" / "prometheus" / "rules"
    copies = CHART / "rules"
    assert {p.name: p.read_text() for p in copies.glob("*.yml")} == {
        p.name: p.read_text() for p in compose.glob("*.yml")
    }, "copy deploy/prometheus/rules/*.yml to charts/dagsmith/rules/"
    [rule] = of_kind(render(VALUES["external-values"]), "PrometheusRule")
    groups = [g for path in sorted(compose.glob("*.yml")) for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
    rules = [r for g in groups for r in g["rules"]]
    assert {"dagsmith:workflow_failure_ratio:rate5m", "dagsmith:queue_depth:by_capability"} <= {
        r.get("record") for r in rules
    }
    assert "DagsmithServiceDown" in {r.get("alert") for r in rules}
    assert of_kind(render(VALUES["demo-values"]), "PrometheusRule") == []  # off by default


def test_settings_keep_their_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helm reads every YAML number as a float64: rendered with toString, 33554432 became
    "3.3554432e+07", which the settings (pydantic) refuse as an int, and every pod crashed."""
    settings = {
        "DAGSMITH_MAX_BODY_BYTES": 33554432,
        "DAGSMITH_LEASE_GRACE": 7.5,
        "DAGSMITH_AUTH": False,
        "DAGSMITH_MAX_TASKS": "100000",  # a string stays as written
        "DAGSMITH_LOG_LEVEL": "DEBUG",
    }
    docs = render({**VALUES["external-values"], "settings": settings})
    [config] = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "dagsmith-settings"]
    assert config["data"] == {
        "DAGSMITH_LOG_FORMAT": "json",  # values.yaml's, beside the ones given
        "DAGSMITH_AMQP_PREFIX": "dagsmith",
        "DAGSMITH_MAX_BODY_BYTES": "33554432",
        "DAGSMITH_LEASE_GRACE": "7.5",
        "DAGSMITH_AUTH": "false",
        "DAGSMITH_MAX_TASKS": "100000",
        "DAGSMITH_LOG_LEVEL": "DEBUG",
    }
    for key, value in config["data"].items():
        monkeypatch.setenv(key, value)
    parsed = Settings(_env_file=None)
    assert (parsed.max_body_bytes, parsed.lease_grace, parsed.auth, parsed.max_tasks) == (33554432, 7.5, False, 100000)


DEFAULT_POOL = yaml.safe_load((CHART / "values.yaml").read_text())["executors"]["pools"][0]


def test_a_pool_needs_only_a_name_and_task_types() -> None:
    """What a pool leaves out takes the default pool's values (values.yaml), KEDA's settings too;
    an explicit 0 is kept."""
    external = {k: v for k, v in VALUES["external-values"].items() if k != "executors"}
    minimal = {"name": DEFAULT_POOL["name"], "types": DEFAULT_POOL["types"]}
    assert DEFAULT_POOL.keys() > minimal.keys()
    docs = render({**external, "executors": {"pools": [minimal]}})
    validate(docs)
    assert docs == render(external)  # the same as values.yaml's default pool, spelt out

    keda = DEFAULT_POOL["keda"]
    pools = [
        {"name": "scaled", "types": "text.*", "keda": {"enabled": True, "queues": ["text.upper"]}},
        {"name": "idle", "types": "http.request", "replicas": 0},
    ]
    values = {**external, "executors": {"pools": pools}}
    lint = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert [m for m in lint["messages"] if m["severity"] >= 2] + lint["errors"] == []
    docs = render(values)
    validate(docs)
    [scaled] = of_kind(docs, "ScaledObject")
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (
        keda["minReplicas"],
        keda["maxReplicas"],
    )
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["value"] == str(keda["queueLength"])
    assert trigger["metadata"]["hostFromEnv"] == keda["hostFromEnv"]
    deployments = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "Deployment")}
    assert "replicas" not in deployments["dagsmith-executor-scaled"]
    assert deployments["dagsmith-executor-idle"]["replicas"] == 0
    for name in ("dagsmith-executor-scaled", "dagsmith-executor-idle"):
        [executor] = deployments[name]["template"]["spec"]["containers"]
        assert f"--concurrency={DEFAULT_POOL['concurrency']}" in executor["args"]
        assert executor["resources"] == DEFAULT_POOL["resources"]


def test_values_the_components_would_refuse_are_refused_at_install() -> None:
    """A status interval the operator refuses (below 0.1 s) made its container crash-loop; a
    namespace or a pool given twice rendered two objects of one name; a KEDA minimum above the
    maximum made a ScaledObject KEDA rejects."""
    external = VALUES["external-values"]
    with pytest.raises(helm.HelmValuesError, match="statusInterval"):
        render({**external, "operator": {"statusInterval": 0.05}})
    assert "--status-interval=0.1" in operator_args(render({**external, "operator": {"statusInterval": 0.1}}))
    twice = {"allNamespaces": False, "namespaces": ["team-a", "team-a"]}
    with pytest.raises(helm.HelmValuesError, match="namespaces"):
        render({**external, "operator": twice})
    pools = [{"name": "text", "types": "text.*"}, {"name": "text", "types": "json.*"}]
    with pytest.raises(helm.HelmRenderError, match='the name "text" is given to two pools'):
        render({**external, "executors": {"pools": pools}})
    keda = {"enabled": True, "queues": ["text.upper"], "minReplicas": 5, "maxReplicas": 2}
    with pytest.raises(
        helm.HelmRenderError, match=r"pools\[text\]\.keda: minReplicas \(5\) is more than maxReplicas \(2\)"
    ):
        render({**external, "executors": {"pools": [{"name": "text", "types": "text.*", "keda": keda}]}})
    keda["maxReplicas"] = 5
    [scaled] = of_kind(
        render({**external, "executors": {"pools": [{"name": "text", "types": "text.*", "keda": keda}]}}),
        "ScaledObject",
    )
    assert scaled["spec"]["minReplicaCount"] == scaled["spec"]["maxReplicaCount"] == 5


def test_global_values_are_accepted(tmp_path: Path) -> None:
    """Helm hands `global` to every chart, a subchart's too: the values schema must allow it."""
    values = {**VALUES["external-values"], "global": {"imageRegistry": "registry.example.com"}}
    assert render(values) == render(VALUES["external-values"])
    parent = tmp_path / "platform"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: dagsmith\n    version: 0.1.0\n"
    )
    shutil.copytree(CHART, parent / "charts" / "dagsmith")
    docs = render({"global": {"imageRegistry": "registry.example.com"}, "dagsmith": VALUES["external-values"]}, parent)
    assert "dagsmith-api" in {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}


DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def test_names_fit_kubernetes_limits_with_the_longest_release_name() -> None:
    """Helm allows 53-character release names. Service names are DNS labels (63 characters at
    most), and so, in effect, are a ScaledObject's and a Job's (copied into label values); a
    StatefulSet's must leave 11 characters for its pods' controller-revision-hash label."""
    release, namespace = "r" * 53, "n" * 63
    pool = {"name": "p" * 32, "types": "text.*", "keda": {"enabled": True, "queues": ["text.upper"]}}
    values: dict[str, Any] = {**VALUES["demo-values"], "executors": {"pools": [DEFAULT_POOL, pool]}}
    docs = render(values, name=release, namespace=namespace)
    validate(docs)
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] in {"Service", "ScaledObject", "Job"}:
            assert len(name) <= 63 and DNS_LABEL.fullmatch(name), f"{doc['kind']} {name}"
        elif doc["kind"] == "StatefulSet":
            assert len(name) <= 52, name
        else:
            assert len(name) <= 253, name
        labels = doc["metadata"].get("labels", {})
        assert all(len(value) <= 63 for value in labels.values()), name
    assert len(of_kind(docs, "Service")) == len({s["metadata"]["name"] for s in of_kind(docs, "Service")})
    # The names still point at each other.
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    workloads = of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
    for service in services.values():
        selector = service["spec"]["selector"].items()
        assert [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
    for statefulset in of_kind(docs, "StatefulSet"):
        assert statefulset["spec"]["serviceName"] == statefulset["metadata"]["name"] in services
    [scaled] = of_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] in {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    [connections] = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-connections")]
    for url in connections["stringData"].values():
        assert re.search(r"@([^:/]+):", url)[1] in services  # type: ignore[index]


# The volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_dagsmith_pods_meet_the_restricted_pod_security_standard() -> None:
    docs = render(VALUES["external-values"])
    pods = [d["spec"]["template"]["spec"] for d in of_kind(docs, "Deployment") + of_kind(docs, "Job")]
    assert len(pods) == 7
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {kind for v in pod["volumes"] for kind in v if kind != "name"} <= RESTRICTED_VOLUMES
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context.get("seccompProfile", {}).get("type", "RuntimeDefault") in {"RuntimeDefault", "Localhost"}
