"""Inter-token latency of running streams while a burst of requests needs cold prefixes from Redis.

Starts redis-server and `prefix-serve serve` (default model, Redis store), uploads hot and cold
prefixes, then runs, alternating, R rounds of: 16 streams alone; 16 streams + a burst of 16 requests
whose prefixes are cold (evicted from the host cache: loaded from Redis); and 16 streams + a burst
of 16 hot-prefix requests (the same prefill work with no loading: the control).
Reports ITL p50/p99 per scenario and the ratios to the no-burst runs.

    python -m bench.cold_burst [--streams 16] [--burst 16] [--rounds 3] [--cold-prefix-len 200]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

from prefix_store.backends.redis import RedisBackend
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.registry import PrefixRegistry
from tests.redis_server import RedisServer
from tests.server_process import running_server

# The default model's KV shape: 30 layers, 3 KV heads, head size 64.
LAYERS, HEADS, DIM = 30, 3, 64
DEFAULT_FINGERPRINT = ModelFingerprint("llama", LAYERS, HEADS, DIM, 49152)


def prefix_blob(p: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    return save({name: torch.randn(HEADS, p, DIM, generator=g) * 0.5 for name in names})


async def stream_one(client: httpx.AsyncClient, task: str, new_tokens: int, started: asyncio.Event) -> list[float]:
    prompt = "Tell me about the sea and the ships"
    body = {"task_id": task, "prompt": prompt, "max_new_tokens": new_tokens, "stream": True}
    times: list[float] = []
    async with client.stream("POST", "/v1/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("token_id") is not None:
                times.append(time.perf_counter())
                if len(times) == 3:
                    started.set()
    return times


async def one_round(
    client: httpx.AsyncClient, streams: int, burst_tasks: list[str], new_tokens: int
) -> tuple[list[float], list[float]]:
    started = asyncio.Event()
    stream_tasks = [asyncio.create_task(stream_one(client, f"hot{i}", new_tokens, started)) for i in range(streams)]
    burst_latency: list[float] = []
    if burst_tasks:
        await started.wait()

        async def burst_request(task: str) -> None:
            t0 = time.perf_counter()
            r = await client.post("/v1/generate", json={"task_id": task, "prompt": "Hi", "max_new_tokens": 1})
            r.raise_for_status()
            burst_latency.append(time.perf_counter() - t0)

        await asyncio.gather(*(burst_request(t) for t in burst_tasks))
    itl: list[float] = []
    for times in await asyncio.gather(*stream_tasks):
        itl.extend(b - a for a, b in itertools.pairwise(times))
    return itl, burst_latency


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        results: dict[str, list[float]] = {"none": [], "cold": [], "hot": []}
        loads: list[float] = []
        for r in range(args.rounds):
            for scenario in ("none", "cold", "hot"):
                if scenario == "cold":
                    # Fresh cold tasks every round: nothing of theirs is resident anywhere yet.
                    burst = [f"cold{r}-{i}" for i in range(args.burst)]
                elif scenario == "hot":
                    burst = [f"hot{i % args.streams}" for i in range(args.burst)]
                else:
                    burst = []
                itl, latency = await one_round(client, args.streams, burst, args.new_tokens)
                results[scenario].extend(itl)
                if scenario == "cold":
                    loads.extend(latency)
                print(f"round {r} {scenario:>4}: ITL p99 {pct(itl, 0.99) * 1000:.0f} ms", flush=True)
    base = pct(results["none"], 0.99)
    return {
        "itl_ms": {
            k: {"p50": round(statistics.median(v) * 1000, 1), "p99": round(pct(v, 0.99) * 1000, 1)}
            for k, v in results.items()
        },
        "p99_ratio_cold_burst_vs_none": round(pct(results["cold"], 0.99) / base, 3),
        "p99_ratio_hot_burst_vs_none": round(pct(results["hot"], 0.99) / base, 3),
        "cold_request_latency_s": {"p50": round(statistics.median(loads), 3), "p99": round(pct(loads, 0.99), 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--hot-prefix-len", type=int, default=10)
    parser.add_argument("--cold-prefix-len", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp))
        redis_server.start()
        try:
            serve_args = ["--store", redis_server.url, "--max-batch-size", str(args.streams + args.burst)]
            with running_server(serve_args, Path(tmp) / "server.log") as server:
                with httpx.Client(base_url=server.url, timeout=120) as c:
                    for i in range(args.streams):
                        c.put(f"/v1/prefixes/hot{i}", content=prefix_blob(args.hot_prefix_len, i)).raise_for_status()
                        c.post("/v1/generate", json={"task_id": f"hot{i}", "prompt": "x", "max_new_tokens": 1})
                # Cold prefixes are written straight to Redis, as another replica would: this server
                # has never seen them, so each burst request loads from Redis (host and device tiers miss).
                other_replica = PrefixRegistry(RedisBackend(redis_server.url), DEFAULT_FINGERPRINT)
                g = torch.Generator().manual_seed(1)
                for r in range(args.rounds):
                    for i in range(args.burst):
                        kv = torch.randn(LAYERS, 2, HEADS, args.cold_prefix_len, DIM, generator=g) * 0.5
                        other_replica.upload("default", f"cold{r}-{i}", kv)
                other_replica.backend.close()
                result = asyncio.run(run(server.url, args))
        finally:
            redis_server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
