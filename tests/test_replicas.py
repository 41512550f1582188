"""Several `prefix-serve serve` processes sharing one real Redis: visibility, versions, Redis faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from tests.redis_server import RedisClusterServers, RedisServer
from tests.server_process import ServerProcess, running_server

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def prefix_blob(p: int, seed: int) -> bytes:
    """A native prefix for the tiny test model: 2 layers, 2 KV heads, head size 16."""
    g = torch.Generator().manual_seed(seed)
    return save(
        {f"layers.{layer}.{kv}": torch.randn(2, p, 16, generator=g) for layer in range(2) for kv in ("key", "value")}
    )


def put(url: str, task: str, blob: bytes) -> httpx.Response:
    return httpx.put(f"{url}/v1/prefixes/{task}", content=blob, headers={"content-type": "application/octet-stream"})


def generate(url: str, task: str | None, timeout: float = 30, **extra: object) -> httpx.Response:
    body = {"task_id": task, "prompt": "The replicas agree that", "max_new_tokens": 4, **extra}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=timeout)


def eventually(check: Callable[[], bool], within: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"not within {within} s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def redis_server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    return make_redis_server(persistent=True)  # AOF: a restart keeps what was written


@pytest.fixture
def replicas(redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    args = ["--model", str(tiny_model_dir), "--store", redis_server.url]
    with ExitStack() as stack:
        yield [stack.enter_context(running_server(args, tmp_path / f"replica{i}.log")) for i in range(2)]


def test_uploads_and_deletes_reach_the_other_replica_within_a_second(replicas: list[ServerProcess]) -> None:
    a, b = (r.url for r in replicas)
    v1 = put(a, "shared", prefix_blob(4, seed=1)).json()["version"]
    assert generate(b, "shared").json()["prefix_version"] == v1  # B now holds v1 in its caches

    v2 = put(a, "shared", prefix_blob(6, seed=2)).json()["version"]
    assert v2 > v1
    eventually(lambda: generate(b, "shared").json()["prefix_version"] == v2, within=1.0)
    assert httpx.get(f"{b}/v1/prefixes/shared").json()["num_virtual_tokens"] == 6

    assert httpx.delete(f"{a}/v1/prefixes/shared").status_code == 204
    eventually(lambda: generate(b, "shared").status_code == 404, within=1.0)
    assert [p["task_id"] for p in httpx.get(f"{b}/v1/prefixes").json()["data"]] == []


def test_redis_down_then_back(replicas: list[ServerProcess], redis_server: RedisServer) -> None:
    a, b = (r.url for r in replicas)
    assert put(a, "hot", prefix_blob(3, seed=3)).status_code == 201
    assert put(a, "cold", prefix_blob(5, seed=4)).status_code == 201
    hot_tokens = generate(b, "hot").json()["token_ids"]  # resident on B from now on

    redis_server.kill()
    # Resident prefixes keep being served (allow one store timeout while the registry notices).
    for _ in range(3):
        r = generate(b, "hot")
        assert r.status_code == 200 and r.json()["token_ids"] == hot_tokens
    # A cold prefix fails fast with 503 and Retry-After.
    start = time.monotonic()
    cold = generate(b, "cold")
    assert cold.status_code == 503 and "retry-after" in cold.headers
    assert cold.json()["error"]["type"] == "unavailable"
    assert time.monotonic() - start < 2.0
    # Uploads fail with 503 and write nothing.
    failed = put(a, "new-task", prefix_blob(2, seed=5))
    assert failed.status_code == 503 and "retry-after" in failed.headers
    assert generate(b, None).status_code == 200  # the base model never needs the store

    redis_server.start()  # same port, same data directory
    eventually(lambda: generate(b, "cold").status_code == 200, within=10.0)
    assert generate(a, "new-task").status_code == 404  # the failed upload left nothing behind
    assert put(a, "new-task", prefix_blob(2, seed=5)).status_code == 201


def test_cold_burst_while_decoding_keeps_tokens_flowing(
    replicas: list[ServerProcess], redis_server: RedisServer
) -> None:
    a, b = (r.url for r in replicas)
    assert put(a, "hot", prefix_blob(3, seed=6)).status_code == 201
    for i in range(8):
        assert put(a, f"cold{i}", prefix_blob(8, seed=10 + i)).status_code == 201
    assert generate(b, "hot").status_code == 200  # resident on B

    token_times: list[float] = []
    stream_done = threading.Event()

    def stream_hot() -> None:
        body = {"task_id": "hot", "prompt": "A long story:", "max_new_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{b}/v1/generate", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("token_id") is not None:
                    token_times.append(time.monotonic())
        stream_done.set()

    streamer = threading.Thread(target=stream_hot)
    streamer.start()
    eventually(lambda: len(token_times) >= 5, within=30)

    # Freeze Redis: every cold load now hangs until the store timeout. The running stream must not care.
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    stalled_at = time.monotonic()
    results: list[tuple[int, float]] = []

    def cold(i: int) -> None:
        start = time.monotonic()
        status = generate(b, f"cold{i}").status_code
        results.append((status, time.monotonic() - start))

    burst = [threading.Thread(target=cold, args=(i,)) for i in range(8)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(10)
    resumed_at = time.monotonic()
    redis_server.proc.send_signal(signal.SIGCONT)

    assert len(results) == 8 and all(status == 503 for status, _ in results), results
    assert max(seconds for _, seconds in results) < 2.0
    during = [t for t in token_times if stalled_at <= t <= resumed_at]
    assert len(during) >= 10, f"only {len(during)} tokens while the cold loads were stuck"
    stream_done.wait(60)
    streamer.join()
    assert len(token_times) == 400


def test_requests_waiting_for_a_cold_prefix_count_as_queued(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """prefix_serve_queue_depth, which the autoscaler reads, counts requests waiting for their prefix to load."""
    args = ["--model", str(tiny_model_dir), "--store", redis_server.url + "?socket_timeout=10"]
    with running_server(args, tmp_path / "server.log") as server:
        for i in range(3):
            assert put(server.url, f"cold{i}", prefix_blob(4, seed=i)).status_code == 201
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # the loads hang until Redis resumes
        results: list[int] = []
        try:
            burst = [
                threading.Thread(target=lambda i=i: results.append(generate(server.url, f"cold{i}").status_code))
                for i in range(3)
            ]
            for t in burst:
                t.start()
            eventually(lambda: queue_depth(server.url) == 3, within=5.0)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        for t in burst:
            t.join(30)
        assert results == [200, 200, 200]
        assert queue_depth(server.url) == 0


def queue_depth(url: str) -> float:
    (line,) = [x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith("prefix_serve_queue_depth ")]
    return float(line.split()[1])


def create_response(url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/responses", json={"max_output_tokens": 6, "temperature": 0, **body}, timeout=30)


def output_text(response: dict) -> str:
    return "".join(p["text"] for item in response["output"] if item["type"] == "message" for p in item["content"])


def test_a_response_made_on_one_replica_is_read_and_continued_on_another(
    replicas: list[ServerProcess], redis_server: RedisServer
) -> None:
    """With a Redis store the Responses API keeps responses in Redis: any replica reads, continues or deletes
    what another made; Redis down, reads answer 503 and a new response is still answered (only not kept)."""
    a, b = (r.url for r in replicas)
    model = httpx.get(f"{a}/v1/models").json()["data"][0]["id"]
    first = create_response(a, model=model, input="My name is Ada.").json()
    assert httpx.get(f"{b}/v1/responses/{first['id']}").json() == first

    second = create_response(b, model=model, previous_response_id=first["id"], input="What is my name?").json()
    whole = [
        {"role": "user", "content": "My name is Ada."},
        *first["output"],
        {"role": "user", "content": "What is my name?"},
    ]
    want = create_response(a, model=model, input=whole, store=False).json()
    assert output_text(second) == output_text(want)
    assert second["usage"]["input_tokens"] == want["usage"]["input_tokens"]
    assert httpx.get(f"{b}/v1/responses/{want['id']}").status_code == 404  # store false: kept nowhere
    # Items A kept, named by their ids on B (Redis keeps each stored item under its id too).
    user_item = httpx.get(f"{a}/v1/responses/{first['id']}/input_items").json()["data"][0]
    refs = [{"type": "item_reference", "id": item["id"]} for item in [user_item, *first["output"]]]
    question = {"role": "user", "content": "What is my name?"}
    by_reference = create_response(b, model=model, input=[*refs, question], store=False).json()
    assert output_text(by_reference) == output_text(want)
    ttl = redis_server.client().ttl(f"ps:{{default}}:resp:{second['id']}")
    assert 0 < ttl <= 24 * 3600  # --responses-ttl-s's default

    # Streamed on B: stored before its last event, so A can continue it as soon as the client reads that event.
    body = {"model": model, "input": "Count to three.", "max_output_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{b}/v1/responses", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    streamed = events[-1]["response"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")  # the last event
    assert httpx.get(f"{a}/v1/responses/{streamed['id']}").json()["output"] == streamed["output"]

    assert httpx.delete(f"{a}/v1/responses/{first['id']}").status_code == 200
    assert httpx.get(f"{b}/v1/responses/{first['id']}").status_code == 404

    redis_server.kill()
    down = httpx.get(f"{b}/v1/responses/{second['id']}")
    assert down.status_code == 503 and "retry-after" in down.headers
    assert create_response(a, model=model, previous_response_id=second["id"], input="Again?").status_code == 503
    unkept = create_response(a, model=model, input="Still there?")
    assert unkept.status_code == 200 and output_text(unkept.json())  # answered, though it could not be kept

    redis_server.start()  # AOF: what was written is back
    eventually(lambda: httpx.get(f"{b}/v1/responses/{second['id']}").status_code == 200, within=10.0)
    assert httpx.get(f"{a}/v1/responses/{unkept.json()['id']}").status_code == 404


def test_store_urls_are_checked_before_the_model_loads_and_passwords_never_shown(
    make_redis_server: Callable[..., RedisServer], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A store the server can never use (a bad URL, a password Redis refuses, a database it does not have) is one
    error line and exit 2 before the model loads; a good one with a password starts, and its log hides it."""
    import subprocess

    from tests.server_process import console_script

    server = make_redis_server(password="sekrit-pw")
    wrong = server.url.replace("sekrit-pw", "wrong-pw")
    cases = [
        ("foo://bar", "unknown store URL scheme 'foo'"),
        (server.url.removesuffix("/0") + "/abc", "the path must be a database number"),
        (wrong, "refused our credentials"),
        (server.url.removesuffix("/0") + "/99", "DB index is out of range"),
    ]
    for url, words in cases:
        # --model points nowhere: the store must be refused before any model is looked for.
        done = subprocess.run(
            [console_script(), "serve", "--model", str(tmp_path / "no-model"), "--store", url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and "wrong-pw" not in done.stderr and "Traceback" not in done.stderr
    with running_server(["--model", str(tiny_model_dir), "--store", server.url], tmp_path / "pw.log") as replica:
        assert put(replica.url, "t", prefix_blob(2, seed=1)).status_code == 201
        assert "sekrit-pw" not in replica.log() and "redis://:***@" in replica.log()


def test_replicas_on_a_redis_cluster(
    make_redis_cluster: Callable[..., RedisClusterServers], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two servers on a three-node Redis Cluster (each given a different node): uploads, new versions and deletes
    on one are served by the other, tasks on every node; a plain redis:// URL to a node is refused by name."""
    import subprocess

    from tests.server_process import console_script

    cluster = make_redis_cluster()
    refused = subprocess.run(
        [console_script(), "serve", "--model", str(tmp_path / "no-model"), "--store", cluster.nodes[0].url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert refused.returncode == 2 and "redis+cluster://" in refused.stderr, refused.stderr
    urls = [f"redis+cluster://127.0.0.1:{node.port}" for node in cluster.nodes[:2]]
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(
                running_server(["--model", str(tiny_model_dir), "--store", url], tmp_path / f"c{i}.log")
            ).url
            for i, url in enumerate(urls)
        )
        tasks = [f"spread{i}" for i in range(6)]
        assert len({cluster.node_of(f"ps:{{default/{t}}}:latest").port for t in tasks}) >= 2
        for i, task in enumerate(tasks):
            assert put(a, task, prefix_blob(4, seed=20 + i)).status_code == 201
        for task in tasks:
            assert generate(b, task).json()["prefix_version"] == 1
        assert sorted(p["task_id"] for p in httpx.get(f"{b}/v1/prefixes").json()["data"]) == tasks
        assert put(a, tasks[0], prefix_blob(6, seed=40)).json()["version"] == 2
        eventually(lambda: generate(b, tasks[0]).json()["prefix_version"] == 2, within=1.0)
        assert httpx.delete(f"{a}/v1/prefixes/{tasks[1]}").status_code == 204
        eventually(lambda: generate(b, tasks[1]).status_code == 404, within=1.0)
