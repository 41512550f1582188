"""Prometheus metrics through the real app: concurrent mixed-prefix requests, then the exposition checked."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from safetensors.torch import save

from server.api.app import create_app
from server.batch import RowInfo
from server.config import ServeConfig
from server.metrics import EngineMetrics, ServerMetrics
from server.model_loading import load_model

# Three prefixes for the tiny model (2 layers, 2 KV heads, head size 16); P sets their size in bytes.
TASKS = {"alpha": 4, "beta": 5, "gamma": 6}
KV_BYTES_PER_P = 2 * 2 * 2 * 16 * 4  # layers x K/V x heads x head_dim x fp32
# Room for two of the three prefixes: uploading the third evicts the first, so a later request misses.
HOST_CACHE_BYTES = (TASKS["beta"] + TASKS["gamma"]) * KV_BYTES_PER_P + 64
CONCURRENT = 9  # three requests per prefix
NEW_TOKENS = 12


def native_blob(p: int, layers: int = 2, heads: int = 2, head_dim: int = 16) -> bytes:
    """A native prefix artifact as the upload endpoint takes it (copied from test_http_api on purpose)."""
    g = torch.Generator().manual_seed(p)
    tensors = {
        f"layers.{layer}.{name}": torch.randn(heads, p, head_dim, generator=g)
        for layer in range(layers)
        for name in ("key", "value")
    }
    return save(tensors)


def put_native(client: TestClient, task_id: str, blob: bytes):
    return client.put(f"/v1/prefixes/{task_id}", content=blob, headers={"content-type": "application/octet-stream"})


def scrape(client: TestClient) -> list[Sample]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def bucket(samples: list[Sample], name: str, le: float) -> float:
    return sum(s.value for s in samples if s.name == name + "_bucket" and float(s.labels["le"]) == le)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


def test_concurrent_mixed_prefixes_move_the_metrics(loaded, tmp_path: Path) -> None:
    config = ServeConfig(store=f"disk://{tmp_path}", host_cache_bytes=HOST_CACHE_BYTES, max_new_tokens=64)
    with TestClient(create_app(config, model=loaded)) as client:
        engine = client.app.state.server.engine
        before = scrape(client)

        for task_id, p in TASKS.items():
            assert put_native(client, task_id, native_blob(p)).status_code == 201
        # "gamma" was just uploaded, so it is in the host cache: a hit.
        warm = client.post("/v1/generate", json={"task_id": "gamma", "prompt": "warm up", "max_new_tokens": 4})
        assert warm.status_code == 200, warm.text
        responses = [warm.json()]

        # Hold the engine's next prefill until every concurrent request is queued: then they are
        # prefilled and decoded together whatever the thread timing, so mixing is guaranteed.
        # With chunked prefill the held call is the first fused step, after the first arrivals were admitted.
        entered, release = threading.Event(), threading.Event()
        held: list[int] = []  # rows admitted before the hold: the first arrivals, one or more
        name = "fused_step" if engine.prefills_in_chunks else "prefill"
        prefill = getattr(engine.runner, name)

        def gated_prefill(*args):
            held.append(engine.num_running if engine.prefills_in_chunks else len(args[0]))
            entered.set()
            release.wait(timeout=60)
            return prefill(*args)

        setattr(engine.runner, name, gated_prefill)
        tasks = list(TASKS) * (CONCURRENT // len(TASKS))
        prompts = [f"Request number {i} says hello to {task}" for i, task in enumerate(tasks)]
        with ThreadPoolExecutor(CONCURRENT) as pool:
            futures = [
                pool.submit(
                    client.post,
                    "/v1/generate",
                    json={"task_id": task, "prompt": prompt, "max_new_tokens": NEW_TOKENS},
                )
                for task, prompt in zip(tasks, prompts, strict=True)
            ]
            deadline = time.monotonic() + 60
            # The first arrivals are inside the held prefill, the others wait in the queue.
            while not (entered.is_set() and held[0] + engine.num_waiting == CONCURRENT):
                assert time.monotonic() < deadline, "requests never queued up"
                time.sleep(0.005)
            queued = scrape(client)
            release.set()
            for future in futures:
                r = future.result(timeout=60)
                assert r.status_code == 200, r.text
                responses.append(r.json())

        after = scrape(client)

    assert total(queued, "prefix_serve_queue_depth") == CONCURRENT - held[0]

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    sent = CONCURRENT + 1
    assert moved("prefix_serve_requests_total", endpoint="/v1/generate") == sent
    assert moved("prefix_serve_requests_total", endpoint="/v1/generate", method="POST", status="200") == sent
    assert moved("prefix_serve_request_duration_seconds_count", endpoint="/v1/generate") == sent
    assert moved("prefix_serve_prefix_uploads_total", status="201") == len(TASKS)
    completion = sum(r["usage"]["completion_tokens"] for r in responses)
    assert moved("prefix_serve_generated_tokens_total") == completion
    assert moved("prefix_serve_prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in responses)
    # One first token per request; every later token is one inter-token gap.
    assert moved("prefix_serve_time_to_first_token_seconds_count") == sent
    assert moved("prefix_serve_inter_token_latency_seconds_count") == completion - sent

    # Forward passes: every one observed once in each batch histogram, and some mixed several prefixes.
    passes = total(after, "prefix_serve_batch_size_count")
    assert passes > 0
    assert total(after, "prefix_serve_batch_distinct_prefixes_count") == passes
    assert total(after, "prefix_serve_batch_padding_ratio_count") == passes
    assert bucket(after, "prefix_serve_batch_distinct_prefixes", 1.0) < passes, "no pass mixed two prefixes"
    assert total(after, "prefix_serve_batch_distinct_prefixes_sum") > passes
    assert bucket(after, "prefix_serve_batch_size", 1.0) < passes
    assert bucket(after, "prefix_serve_batch_size", 8.0) < passes, "the concurrent requests never shared a batch"
    assert 0.0 < total(after, "prefix_serve_batch_padding_ratio_sum") < passes  # unequal prompts pad, never fully

    # The host tier: "gamma" hit once at least; "alpha", evicted by the third upload, missed and was loaded.
    assert moved("prefix_serve_prefix_cache_hits_total", tier="host") >= 1
    misses = moved("prefix_serve_prefix_cache_misses_total", tier="host")
    assert misses >= 1
    assert moved("prefix_serve_prefix_load_seconds_count", source="disk") == misses
    assert moved("prefix_serve_prefix_cache_evictions_total", tier="host") >= 1
    assert 0 < total(after, "prefix_serve_prefix_cache_bytes", tier="host") <= HOST_CACHE_BYTES
    assert total(after, "prefix_serve_prefixes_resident", tier="host") == 2
    assert total(after, "prefix_serve_model_info", device="cpu", dtype="float32") == 1
    assert total(after, "process_resident_memory_bytes") > 0


def test_made_up_methods_share_one_label_value(loaded, tmp_path: Path) -> None:
    """A method is the client's to choose, and refused before authentication: each made-up one was a new series."""
    with TestClient(create_app(ServeConfig(store=f"disk://{tmp_path}"), model=loaded)) as client:
        for method in ("FOO", "BAR", "X-CUSTOM-1"):
            assert client.request(method, "/v1/generate").status_code == 405
        assert client.get("/health").status_code == 200
        samples = scrape(client)
    methods = {s.labels["method"] for s in samples if s.name == "prefix_serve_requests_total"}
    assert methods == {"GET", "other"}
    assert total(samples, "prefix_serve_requests_total", method="other", status="405") == 3


def test_openmetrics_when_asked(loaded, tmp_path: Path) -> None:
    with TestClient(create_app(ServeConfig(store=f"disk://{tmp_path}"), model=loaded)) as client:
        r = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")
        assert "_created" not in r.text and "_created" not in scrape(client), "no creation-time series"
        # /metrics needs no key even when keys are configured; the scrape itself is counted.
        plain = scrape(client)
        assert total(plain, "prefix_serve_requests_total", endpoint="/metrics", status="200") >= 1
        assert total(plain, "prefix_serve_requests_total", endpoint="unmatched") == 0
        client.get("/no/such/path")
        assert total(scrape(client), "prefix_serve_requests_total", endpoint="unmatched", status="404") == 1


def test_each_app_has_its_own_registry() -> None:
    first, second = ServerMetrics(), ServerMetrics()  # the global registry would refuse the second
    first.engine.generated_tokens.inc(3)
    assert first.registry.get_sample_value("prefix_serve_generated_tokens_total") == 3
    assert second.registry.get_sample_value("prefix_serve_generated_tokens_total") == 0


def test_forward_pass_figures() -> None:
    metrics = ServerMetrics()
    engine: EngineMetrics = metrics.engine
    rows = [RowInfo("a", "t/x@1", 3), RowInfo("b", "t/x@1", 3), RowInfo("c", None, 0), RowInfo("d", "t/y@2", 5)]
    engine.forward_pass(rows, slots=40, real_slots=30)  # 4 rows x 10 slots, 30 real
    get = metrics.registry.get_sample_value
    assert get("prefix_serve_batch_size_sum") == 4
    assert get("prefix_serve_batch_distinct_prefixes_sum") == 2  # rows without a prefix are not a prefix
    assert get("prefix_serve_batch_padding_ratio_sum") == pytest.approx(0.25)


def test_cuda_memory_families(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA gauges' shape, with the allocator faked: no GPU on the test machines."""
    from server.metrics import _cuda_memory

    for name, value in (("memory_allocated", 10), ("memory_reserved", 20), ("max_memory_allocated", 15)):
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    families = {f.name: f for f in _cuda_memory(torch.device("cuda:0"))}
    assert {name: f.samples[0].value for name, f in families.items()} == {
        "prefix_serve_cuda_memory_allocated_bytes": 10,
        "prefix_serve_cuda_memory_reserved_bytes": 20,
        "prefix_serve_cuda_memory_peak_allocated_bytes": 15,
    }
    assert all(f.samples[0].labels == {"device": "cuda:0"} for f in families.values())


def test_prompt_cache_hits_through_the_app_change_no_token(loaded, tmp_path: Path) -> None:
    """Chat requests of one task sharing a long system prompt: the second takes the shared head's K/V from the
    prompt cache (counted in its metric) and generates what a server without the cache does."""
    system = {"role": "system", "content": "You answer in the voice of a ship's log. " * 8}
    chats = [[system, {"role": "user", "content": text}] for text in ("Where are we?", "What is the weather?")]
    outputs: dict[int, list[list[int]]] = {}
    hits: dict[int, float] = {}
    reported: dict[int, list[int]] = {}  # each response's usage.cached_tokens
    for budget in (0, 64 << 20):
        config = ServeConfig(store=f"disk://{tmp_path / str(budget)}", prompt_cache_bytes=budget, max_new_tokens=64)
        with TestClient(create_app(config, model=loaded)) as client:
            assert put_native(client, "log", native_blob(5)).status_code == 201
            before = scrape(client)
            outputs[budget], reported[budget] = [], []
            for messages in chats:
                body = {"task_id": "log", "messages": messages, "max_new_tokens": 10}
                r = client.post("/v1/generate", json=body)
                assert r.status_code == 200, r.text
                outputs[budget].append(r.json()["token_ids"])
                reported[budget].append(r.json()["usage"]["cached_tokens"])
            after = scrape(client)
            hits[budget] = total(after, "prefix_serve_prompt_cache_hit_tokens_total") - total(
                before, "prefix_serve_prompt_cache_hit_tokens_total"
            )
            held = total(after, "prefix_serve_prompt_cache_bytes")
            assert held == (0 if budget == 0 else client.app.state.server.engine.prompt_cache.bytes) and (
                held > 0 or budget == 0
            )
    prompt = loaded.tokenizer.apply_chat_template(chats[1], add_generation_prompt=True, tokenize=False)
    shared = len(loaded.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert hits[0] == 0 and 32 <= hits[64 << 20] < shared, hits
    assert reported == {0: [0, 0], 64 << 20: [0, hits[64 << 20]]}, "each response reports its cache hits"
    assert outputs[0] == outputs[64 << 20]
