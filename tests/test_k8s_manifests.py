"""Static checks of docker/k8s/: no cluster runs here, so parse the manifests and check them against each other
and against the server (its /health route, its port, the metric names a live /metrics exports)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.cli import _SERVE_FLAGS, ENV_PREFIX
from server.config import ServeConfig
from server.model_loading import load_model

K8S = Path(__file__).resolve().parent.parent / "docker" / "k8s"
EXTRA_ENV = {"INSECURE_NO_AUTH", "LOG_LEVEL", "LOG_FORMAT"}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind (each file holds one)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    assert {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler", "ConfigMap"} <= set(out)
    return out


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], set[str]]:
    """(metric families a live /metrics exports, the probe/scrape paths answering 200 without an API key)."""
    config = ServeConfig(store=f"disk://{tmp_path_factory.mktemp('k8s-store')}")
    with TestClient(create_app(config, model=load_model(str(tiny_model_dir)))) as client:
        routes = {path for path in ("/health", "/metrics") if client.get(path).status_code == 200}
        families = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    return families, routes


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (server,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def test_deployment_requests_one_gpu_and_runs_as_non_root(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    server = container(manifests)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["resources"]["requests"]["nvidia.com/gpu"] == 1
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    env = {e["name"]: e for e in server["env"]}
    drain = float(env["PREFIX_SERVE_DRAIN_TIMEOUT_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > drain, "the pod must outlive the drain"


def test_env_is_what_the_cli_reads(manifests: dict[str, dict[str, Any]]) -> None:
    env = {e["name"]: e for e in container(manifests)["env"]}
    known = {name.upper() for name in _SERVE_FLAGS} | EXTRA_ENV
    for name in env:
        assert name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX) in known, f"unknown {name}"
    assert env["PREFIX_SERVE_HOST"]["value"] == "0.0.0.0"
    assert env["PREFIX_SERVE_MODEL"]["value"].startswith("/")  # a mounted model directory
    mounts = {m["mountPath"]: m["name"] for m in container(manifests)["volumeMounts"]}
    volumes = {v["name"]: v for v in manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    model_mount = next(path for path in mounts if env["PREFIX_SERVE_MODEL"]["value"].startswith(path + "/"))
    claim = volumes[mounts[model_mount]]["persistentVolumeClaim"]["claimName"]
    assert manifests["PersistentVolumeClaim"]["metadata"]["name"] == claim


def test_secrets_come_from_the_secret(manifests: dict[str, dict[str, Any]]) -> None:
    secret = manifests["Secret"]
    name, data = secret["metadata"]["name"], secret["stringData"]
    env = {e["name"]: e for e in container(manifests)["env"]}
    ref = env["PREFIX_SERVE_STORE"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == name and ref["key"] in data
    assert re.fullmatch(r"rediss?://.*@[\w.-]+:\d+/\d+", data[ref["key"]])
    # The API key file is mounted from the same Secret where PREFIX_SERVE_API_KEYS points.
    keys_path = Path(env["PREFIX_SERVE_API_KEYS"]["value"])
    volumes = {v["name"]: v for v in manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container(manifests)["volumeMounts"] if m["mountPath"] == str(keys_path.parent)]
    source = volumes[mount["name"]]["secret"]
    assert source["secretName"] == name
    assert {"key": keys_path.name, "path": keys_path.name} in source["items"] and keys_path.name in data
    assert yaml.safe_load(data[keys_path.name])[0].keys() >= {"tenant", "key"}


def test_probes_hit_health_on_the_container_port(
    manifests: dict[str, dict[str, Any]], live: tuple[set[str], set[str]]
) -> None:
    server = container(manifests)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert list(ports.values()) == [int(env["PREFIX_SERVE_PORT"])]
    _, routes = live
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] == "/health" and get["path"] in routes
        port = get["port"]
        assert (ports[port] if isinstance(port, str) else port) == int(env["PREFIX_SERVE_PORT"])
    annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    assert int(annotations["prometheus.io/port"]) == int(env["PREFIX_SERVE_PORT"])


def test_service_selects_the_pods(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["Service"]["spec"]
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(manifests)["ports"]}
    assert all(p["targetPort"] in port_names for p in service["ports"])


def test_hpa_scales_on_an_exported_queue_metric(
    manifests: dict[str, dict[str, Any]], live: tuple[set[str], set[str]]
) -> None:
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", manifests["Deployment"]["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    families, _ = live
    assert name == "prefix_serve_queue_depth" and name in families
    # The adapter rule selects that exported series and publishes it under the name the HPA asks for.
    (rule,) = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])["rules"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"])
    assert series is not None and series.group(1) in families
    assert re.sub(rule["name"]["matches"], rule["name"]["as"], series.group(1)) == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
