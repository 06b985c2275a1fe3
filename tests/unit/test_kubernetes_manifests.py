"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas and agree with Strata itself (its
config loader, its ports, probes, drain timings, metrics, commands and `strata plan`'s output); the Prometheus
and Grafana provisioning files load as they are."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from strata.api.server import STREAM_CUT_S
from strata.config_loader import load_config
from strata.observability.request_metrics import RequestMetrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
ENV = {"VLLM_API_KEY": "x"}  # what the pods get from the Secret; the config names it


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def every_manifest() -> list[tuple[str, dict[str, Any]]]:
    return [
        (p.name, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in documents(p.name)
    ]


def by_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in every_manifest() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def strata_container(kind: str = "Deployment", name: str = "strata") -> dict[str, Any]:
    return by_kind(kind, name)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(("file", "manifest"), every_manifest(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_manifest_validates_against_the_kubernetes_schema(file: str, manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example_and_the_job() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml", "migrate-job.yaml"}
    assert listed == on_disk


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "strata.yaml"
    path.write_text(by_kind("ConfigMap", "strata-config")["data"]["strata.yaml"])
    return path


def test_the_configmap_is_a_config_strata_loads_and_the_probes_match_it(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path), ENV)
    container = strata_container()
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", config.server.port)
    assert config.server.host == "0.0.0.0"  # reachable from the Service
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["args"] == ["serve", "--config", "/etc/strata/strata.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/strata" and Path(mounts["data"]) == config.data_dir
    grace = by_kind("Deployment", "strata")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.server.drain_delay_s + config.server.shutdown_grace_s + STREAM_CUT_S
    # The readiness probe notices the drain before the listener closes.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < config.server.drain_delay_s


def test_every_secret_a_pod_needs_is_in_the_example_and_every_env_the_config_names_is_set(tmp_path: Path) -> None:
    example = by_kind("Secret", "strata-secrets")["stringData"]
    config = load_config(config_file(tmp_path), ENV)
    for kind, name in (("Deployment", "strata"), ("Job", "strata-migrate"), ("Deployment", "vllm-llama-3-1-8b")):
        env = strata_container(kind, name)["env"]
        for variable in env:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "strata-secrets"
            assert ref["key"] in example, f"{name}: {variable['name']} refers to a key the Secret lacks"
        names = {v["name"] for v in env}
        if name != "vllm-llama-3-1-8b":
            assert {m.api_key_env for m in config.models if getattr(m, "api_key_env", None)} <= names


def test_the_model_in_the_config_is_the_vllm_service_and_only_strata_may_reach_it(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path), ENV)
    (model,) = config.models
    service = by_kind("Service", "vllm-llama-3-1-8b")
    (port,) = service["spec"]["ports"]
    assert str(model.base_url) == f"http://{service['metadata']['name']}:{port['port']}/v1"
    vllm = strata_container("Deployment", "vllm-llama-3-1-8b")
    assert vllm["args"][vllm["args"].index("--served-model-name") + 1] == model.upstream_model
    policy = by_kind("NetworkPolicy", "inference-from-strata-only")
    pod_labels = by_kind("Deployment", "vllm-llama-3-1-8b")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["spec"]["ingress"]
    allowed = rule["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= by_kind("Deployment", "strata")["spec"]["template"]["metadata"]["labels"].items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_vllm_yaml_is_what_strata_plan_writes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "strata", "plan", "llama-3.1-8b", "--gpu-count", "1", "--gpu-memory-gib", "80",
         "--gpu-name", "H100", "--concurrency", "16", "--max-context", "8192", "--kubernetes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == (K8S / "vllm.yaml").read_text()


def test_the_autoscaler_scales_on_a_metric_strata_exports() -> None:
    registry = CollectorRegistry()
    RequestMetrics(registry)
    exported = {metric.name + ("_total" if metric.type == "counter" else "") for metric in registry.collect()}
    (rule,) = yaml.safe_load(by_kind("ConfigMap", "strata-adapter-rules")["data"]["config.yaml"])["rules"]
    series = rule["seriesQuery"].split("{")[0].strip("'")
    assert series in exported
    hpa = by_kind("HorizontalPodAutoscaler", "strata")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "strata"


def test_the_migration_job_runs_a_real_command(tmp_path: Path) -> None:
    job = strata_container("Job", "strata-migrate")
    args = [a if a != "/etc/strata/strata.yaml" else str(config_file(tmp_path)) for a in job["args"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")} | ENV
    env["STRATA_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/strata.db"
    env["STRATA_DATA_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "strata", *args], capture_output=True, text=True, env=env,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "strata.db").exists()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package")
def test_the_prometheus_config_loads_as_is(tmp_path: Path) -> None:
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(REPO / "deploy" / "prometheus" / name, tmp_path / name)
    (tmp_path / "strata.key").write_text("a-key-with-metrics-read\n")
    result = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_grafana_provisioning_names_a_prometheus_source_and_the_dashboard_folder() -> None:
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "strata-prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "strata.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    dashboard = yaml.safe_load((REPO / "deploy" / "grafana" / "strata-dashboard.json").read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert (variable["type"], variable["query"]) == ("datasource", source["type"])
