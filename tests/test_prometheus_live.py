"""A real Prometheus (Debian's `prometheus` package) against a running server, and promtool's checks.

Skipped when the binaries are missing (`apt-get install prometheus`). Everything runs on loopback ports in a
temporary directory; no system service is used.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import load_model
from tests.live_server import serve_in_thread
from tests.redis_server import free_port

DOCKER = Path(__file__).resolve().parent.parent / "docker"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="prometheus/promtool not installed (apt-get install prometheus)"
)
QUERY = "sum(rate(prefix_serve_generated_tokens_total[10s]))"
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("prom-store")
    app = create_app(ServeConfig(store=f"disk://{store}"), model=load_model(str(tiny_model_dir)))
    with serve_in_thread(app) as url:
        yield url


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=30)


def test_promtool_check_metrics(server_url: str) -> None:
    httpx.post(server_url + "/v1/generate", json={"prompt": "hello", "max_new_tokens": 2}, timeout=30)
    exposition = httpx.get(server_url + "/metrics", timeout=10).text  # the text format Prometheus scrapes
    result = promtool("check", "metrics", stdin=exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""  # no lint findings either


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(DOCKER / "alert_rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_error_rate_alert_counts_clients_requests_only(tmp_path: Path) -> None:
    """promtool's rule unit tests: /health's 503s while a replica drains page no one; 10% of generations failing
    does, and the probes' 200s do not dilute it."""

    def series(endpoint: str, status: str, per_minute: int) -> dict[str, str]:
        labels = f'instance="a",method="GET",endpoint="{endpoint}",status="{status}"'
        return {"series": f"prefix_serve_requests_total{{{labels}}}", "values": f"0+{per_minute}x20"}

    paging = {
        "exp_labels": {"severity": "page", "instance": "a"},
        "exp_annotations": {"summary": "a: over 5% of requests fail with a 5xx"},
    }
    tests = [
        {  # draining: readiness probes get 503 while the clients' generations finish
            "interval": "1m",
            "input_series": [series("/health", "503", 6), series("/v1/generate", "200", 10)],
            "alert_rule_test": [{"eval_time": "15m", "alertname": "PrefixServeHighErrorRate", "exp_alerts": []}],
        },
        {  # 1 generation in 10 fails, beside many probes and scrapes that succeed
            "interval": "1m",
            "input_series": [
                series("/v1/generate", "200", 9),
                series("/v1/generate", "500", 1),
                series("/health", "200", 60),
                series("/metrics", "200", 60),
            ],
            "alert_rule_test": [{"eval_time": "15m", "alertname": "PrefixServeHighErrorRate", "exp_alerts": [paging]}],
        },
    ]
    spec = {"rule_files": [str(DOCKER / "alert_rules.yml")], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(spec))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_generated_token_rate(server_url: str, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    target = server_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DOCKER / "alert_rules.yml")],  # the shipped rules load and evaluate
        "scrape_configs": [{"job_name": "prefix-serve", "static_configs": [{"targets": [target]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    assert promtool("check", "config", str(config_path)).returncode == 0
    port = free_port()
    prom_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + DEADLINE_S
        rate = 0.0
        while rate <= 0:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"no positive rate from Prometheus:\n{log_path.read_text()}"
            # Keep tokens flowing so that two consecutive scrapes see the counter move.
            reply = httpx.post(server_url + "/v1/generate", json={"prompt": "count", "max_new_tokens": 8}, timeout=30)
            assert reply.status_code == 200, reply.text
            try:
                response = httpx.get(prom_url + "/api/v1/query", params={"query": QUERY}, timeout=5)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.3)
                continue
            if response.status_code == 503:  # listening, but still starting ("Service Unavailable", not JSON)
                time.sleep(0.3)
                continue
            answer = response.json()
            assert answer["status"] == "success", answer
            result = answer["data"]["result"]
            rate = float(result[0]["value"][1]) if result else 0.0
            if rate <= 0:
                time.sleep(0.3)
        targets = httpx.get(prom_url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        rules = httpx.get(prom_url + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) >= 4
        assert all(r["health"] != "err" for g in rules for r in g["rules"]), rules
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
