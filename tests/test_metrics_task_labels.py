"""The opt-in ``task`` metric label (--metrics-task-labels N): the first N tasks named, the rest under "other"."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.api.app import create_app
from server.batch import RowInfo
from server.cli import main
from server.config import ServeConfig
from server.metrics import BASE_TASK, NO_TASK, OTHER_TASK, EngineMetrics, TaskLabels
from server.model_loading import load_model
from tests.test_metrics import native_blob, put_native

PROMTOOL = shutil.which("promtool")
ALICE = {"authorization": "Bearer alice-key-for-task-label-tests"}
BOB = {"authorization": "Bearer bob-key-for-task-label-tests"}
ADMIN = {"authorization": "Bearer admin-key-for-task-label-tests"}  # with keys, task labels are an admin's to read
NEW_TOKENS = 6
TOKEN_FAMILIES = (
    "prefix_serve_generated_tokens_total",
    "prefix_serve_prompt_tokens_total",
    "prefix_serve_time_to_first_token_seconds_count",
)


@dataclass(frozen=True)
class Sent:
    """One generation request of the scenario and the ``task`` value it must be counted under."""

    endpoint: str
    task: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Run:
    text: str  # the text exposition, as Prometheus scrapes it
    samples: list[Sample]
    sent: list[Sent]


def scrape_text(client: TestClient, headers: dict[str, str] | None = None) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    return response.text


def parse(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def task_values(samples: list[Sample], name: str) -> set[str]:
    return {s.labels["task"] for s in samples if s.name == name}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def labelled_run(loaded, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Two tenants, four tasks, N=2, through the real app and lifespan, on both generation APIs.

    The first two tasks used are alice's "alpha" and bob's "alpha" (one id, two tenants: two values);
    alice's "beta" and later "delta" come after, so they count under "other".
    """
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(
        json.dumps(
            [
                {"tenant": "alice", "key": ALICE["authorization"].removeprefix("Bearer ")},
                {"tenant": "bob", "key": BOB["authorization"].removeprefix("Bearer ")},
                {"tenant": "ops", "key": ADMIN["authorization"].removeprefix("Bearer "), "admin": True},
            ]
        )
    )
    store = tmp_path_factory.mktemp("store")
    config = ServeConfig(store=f"disk://{store}", api_keys=str(keys), metrics_task_labels=2, max_new_tokens=16)
    sent: list[Sent] = []

    def generate(headers: dict[str, str], task_id: str | None, task: str, prompt: str) -> None:
        body = {"task_id": task_id, "prompt": prompt, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        r = client.post("/v1/generate", json=body, headers=headers)
        usage = r.json().get("usage", {})
        sent.append(
            Sent("/v1/generate", task, r.status_code, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        )

    def complete(headers: dict[str, str], model: str, task: str) -> None:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": NEW_TOKENS}
        r = client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        sent.append(Sent("/v1/completions", task, 200, usage["prompt_tokens"], usage["completion_tokens"]))

    with TestClient(create_app(config, model=loaded)) as client:
        for headers, task_id, p in ((ALICE, "alpha", 4), (ALICE, "beta", 5), (BOB, "alpha", 6), (ALICE, "delta", 3)):
            r = put_native_as(client, headers, task_id, p)
            assert r.status_code == 201, r.text
        # Uploads are no generation: they take no slot, whatever their path names; nor does a request the engine
        # refuses before its first token (its prompt and max_new_tokens overflow the 512-token context).
        generate(ALICE, "delta", NO_TASK, "word " * 600)
        assert sent[-1].status == 422
        generate(ALICE, "alpha", "alice/alpha", "first task seen")
        generate(ALICE, None, BASE_TASK, "the base model takes no slot")
        complete(BOB, "alpha", "bob/alpha")  # the second and last slot
        generate(ALICE, "beta", OTHER_TASK, "third task: no slot left")
        generate(ALICE, "nope", NO_TASK, "an unknown task id claims nothing")  # 404
        assert sent[-1].status == 404

        # Concurrent requests share forward passes: the engine sums each step's tokens per label.
        mixed = [(ALICE, "alpha", "alice/alpha"), (BOB, "alpha", "bob/alpha"), (ALICE, "beta", OTHER_TASK)] * 2
        mixed += [(ALICE, "delta", OTHER_TASK), (BOB, None, BASE_TASK)]
        with ThreadPoolExecutor(len(mixed)) as pool:
            futures = [
                pool.submit(generate, headers, task_id, task, f"concurrent request {i}")
                for i, (headers, task_id, task) in enumerate(mixed)
            ]
            for future in futures:
                future.result(timeout=120)

        # A deleted task keeps its slot: its counters stay monotonic, and the same id uploaded again reuses it.
        assert client.delete("/v1/prefixes/alpha", headers=ALICE).status_code == 204
        generate(ALICE, "alpha", NO_TASK, "deleted: 404")
        assert sent[-1].status == 404
        assert put_native_as(client, ALICE, "alpha", 7).status_code == 201
        generate(ALICE, "alpha", "alice/alpha", "uploaded again")
        text = scrape_text(client, ADMIN)
    return Run(text, parse(text), sent)


def put_native_as(client: TestClient, headers: dict[str, str], task_id: str, p: int):
    return client.put(
        f"/v1/prefixes/{task_id}",
        content=native_blob(p),
        headers={**headers, "content-type": "application/octet-stream"},
    )


def test_first_n_tasks_get_a_label_later_ones_other(labelled_run: Run) -> None:
    samples, sent = labelled_run.samples, labelled_run.sent
    assert all(s.status in (200, 404, 422) for s in sent)
    assert {s.status for s in sent if s.task != NO_TASK} == {200}
    generated = [s for s in sent if s.status == 200]

    # Each family carries exactly the two named tasks, "other" and "base": never a third task.
    named = {"alice/alpha", "bob/alpha", OTHER_TASK, BASE_TASK}
    for family in (*TOKEN_FAMILIES, "prefix_serve_time_to_first_token_seconds_bucket"):
        assert task_values(samples, family) == named, family
    # Request counts add NO_TASK (uploads, deletes, scrapes, 404s) and no other value.
    assert task_values(samples, "prefix_serve_requests_total") == named | {NO_TASK}

    for task in named:
        mine = [s for s in generated if s.task == task]
        assert mine, task
        assert total(samples, "prefix_serve_generated_tokens_total", task=task) == sum(
            s.completion_tokens for s in mine
        ), task
        assert total(samples, "prefix_serve_prompt_tokens_total", task=task) == sum(s.prompt_tokens for s in mine)
        assert total(samples, "prefix_serve_time_to_first_token_seconds_count", task=task) == len(mine)
        for endpoint in ("/v1/generate", "/v1/completions"):
            counted = total(samples, "prefix_serve_requests_total", endpoint=endpoint, status="200", task=task)
            assert counted == sum(1 for s in mine if s.endpoint == endpoint), (task, endpoint)
    # ignore_eos: every native request ran to its length, so the token counts above are not all zero.
    assert all(s.completion_tokens == NEW_TOKENS for s in generated if s.endpoint == "/v1/generate")
    assert total(samples, "prefix_serve_generated_tokens_total", task=OTHER_TASK) == 4 * NEW_TOKENS  # beta x3, delta

    # Refused before the engine: the unknown and the deleted task are counted without a task value.
    refused = total(samples, "prefix_serve_requests_total", endpoint="/v1/generate", status="404", task=NO_TASK)
    assert refused == 2
    too_long = total(samples, "prefix_serve_requests_total", endpoint="/v1/generate", status="422", task=NO_TASK)
    assert too_long == 1
    assert total(samples, "prefix_serve_requests_total", method="PUT", status="201", task=NO_TASK) == 5


def test_promtool_accepts_the_labelled_exposition(labelled_run: Run) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=labelled_run.text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""  # no lint findings either
    assert 'task="other"' in labelled_run.text  # the exposition checked is the labelled one


def test_task_labels_need_an_admin_key_to_read(loaded, tmp_path: Path) -> None:
    """The label names every tenant's tasks: with keys, /metrics then answers admins only (it needs no key else)."""
    keys = tmp_path / "keys.json"
    entries = [
        {"tenant": "alice", "key": ALICE["authorization"].removeprefix("Bearer ")},
        {"tenant": "ops", "key": ADMIN["authorization"].removeprefix("Bearer "), "admin": True},
    ]
    keys.write_text(json.dumps(entries))
    for task_labels in (0, 2):
        config = ServeConfig(store=f"disk://{tmp_path / 'store'}", api_keys=str(keys), metrics_task_labels=task_labels)
        with TestClient(create_app(config, model=loaded)) as client:
            assert put_native_as(client, ALICE, "secret-plan", 4).status_code == 201
            body = {"task_id": "secret-plan", "prompt": "hello", "max_new_tokens": 2}
            assert client.post("/v1/generate", json=body, headers=ALICE).status_code == 200
            anonymous, tenant, admins = (client.get("/metrics", headers=h) for h in ({}, ALICE, ADMIN))
            if task_labels:
                assert (anonymous.status_code, tenant.status_code, admins.status_code) == (401, 403, 200)
                assert "secret-plan" not in anonymous.text + tenant.text
                assert "admin key" in tenant.json()["error"]["message"]
                assert 'task="alice/secret-plan"' in admins.text
            else:
                assert anonymous.status_code == tenant.status_code == 200
                assert "secret-plan" not in anonymous.text


def test_off_by_default_no_task_label_anywhere(loaded, tmp_path: Path) -> None:
    with TestClient(create_app(ServeConfig(store=f"disk://{tmp_path}"), model=loaded)) as client:
        assert put_native(client, "alpha", native_blob(4)).status_code == 201
        for task_id in ("alpha", None):
            body = {"task_id": task_id, "prompt": "hello", "max_new_tokens": 3}
            assert client.post("/v1/generate", json=body).status_code == 200
        samples = parse(scrape_text(client))
    assert not [s for s in samples if "task" in s.labels]
    # Today's label sets, which the dashboard and alert rules query.
    label_sets = {
        "prefix_serve_requests_total": {"method", "endpoint", "status"},
        "prefix_serve_generated_tokens_total": set(),
        "prefix_serve_prompt_tokens_total": set(),
        "prefix_serve_time_to_first_token_seconds_bucket": {"le"},
        "prefix_serve_time_to_first_token_seconds_count": set(),
    }
    for name, labels in label_sets.items():
        seen = [s for s in samples if s.name == name]
        assert seen and all(set(s.labels) == labels for s in seen), name
    assert total(samples, "prefix_serve_time_to_first_token_seconds_count") == 2


def test_engine_sums_a_step_per_label() -> None:
    """Versions of one task share its value; tasks past the limit share "other"; each label is one increment."""
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, TaskLabels(1))
    rows = [
        RowInfo("a", "t/x@1", 3),
        RowInfo("b", "t/x@2", 3),  # the same task, a newer version
        RowInfo("c", "t/y@1", 3),
        RowInfo("d", "u/x@1", 3),  # another tenant's "x": another task
        RowInfo("e", None, 0),
    ]
    metrics.generated(rows)
    metrics.generated(rows[2:4])
    get = registry.get_sample_value
    assert get("prefix_serve_generated_tokens_total", {"task": "t/x"}) == 2
    assert get("prefix_serve_generated_tokens_total", {"task": OTHER_TASK}) == 4
    assert get("prefix_serve_generated_tokens_total", {"task": BASE_TASK}) == 1
    assert get("prefix_serve_generated_tokens_total", {"task": "t/y"}) is None


def test_task_labels_never_grow_past_the_limit_across_threads() -> None:
    labels = TaskLabels(5)
    seen: list[Counter[str]] = []
    start = threading.Barrier(8)

    def hammer(worker: int) -> None:
        start.wait()
        got: Counter[str] = Counter()
        for i in range(400):
            task = f"tenant{(worker + i) % 8}/task{i % 50}"
            got[task if labels.value(task) == task else OTHER_TASK] += 1
        seen.append(got)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    named = set().union(*seen) - {OTHER_TASK}
    assert len(named) == 5
    # A task's value never changes once given: every named task answers with itself, every other one "other".
    for task in {f"tenant{t}/task{i}" for t in range(8) for i in range(50)}:
        assert labels.value(task) == (task if task in named else OTHER_TASK)


def test_one_tenant_cannot_take_every_task_label() -> None:
    """A tenant takes a slot only while it holds fewer than are free: at most half, and newcomers still get one."""
    labels = TaskLabels(8)
    flood = [f"flood/task{i}" for i in range(100)]
    named_flood = [task for task in flood if labels.value(task) == task]
    assert named_flood == flood[:4]  # 0 < 8, 1 < 7, 2 < 6, 3 < 5; then 4 held, 4 free
    assert labels.value("calm/a") == "calm/a"
    assert labels.value("calm/b") == "calm/b"  # 1 held < 3 free
    assert labels.value("calm/c") == OTHER_TASK  # 2 held, 2 free
    # Every later tenant still finds one of the slots left, until none is.
    assert [labels.value(f"t{i}/x") for i in range(3)] == ["t0/x", "t1/x", OTHER_TASK]
    # A slot once given keeps its value, whoever asks later.
    assert labels.value(flood[0]) == flood[0] and labels.value("calm/b") == "calm/b"


def test_negative_task_label_count_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--metrics-task-labels", "-1"]) == 2
    assert "--metrics-task-labels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        TaskLabels(0)
