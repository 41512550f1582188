"""Inter-token latency of running streams while a burst of requests needs cold prefixes from Redis.

Starts redis-server and `prefix-serve serve` (default model, Redis store), uploads hot and cold
prefixes, then runs, alternating, R rounds of: 16 streams alone; 16 streams + a burst of 16 requests
whose prefixes are cold (evicted from the host cache: loaded from Redis); the same burst again, its
prefixes now resident ("warm": the cold burst's engine work without the loads); and 16 streams + a
burst of 16 requests with the streams' own short prefixes ("hot": the prefill work alone). ITL counts the
gaps after every stream is decoding (3 tokens each), when the burst is sent: the streams' own joins
are not part of it.
Reports ITL p50/p99 per scenario, the ratios to the no-burst runs, and the burst requests' latency
(one token each: their time to first token). With --variant NAME=FLAGS (repeatable) one server per
variant runs on the same Redis and the rounds alternate between them, so variants are compared under
the same background load.

    python -m bench s5 [--s5-rounds 3]   # the same, inside the harness (results.json, results.md, a plot)
    python -m bench.cold_burst [--streams 16] [--burst 16] [--rounds 3] [--cold-prefix-len 200]
        [--variant 'budget=--max-prefill-tokens 64' ...]
    python -m bench.cold_burst --floor   # in-process step times that bound the ratio on this machine
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

from bench.variants import add_variant_option, flag_list, parse_variants
from prefix_store.backends.redis import RedisBackend
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.registry import PrefixRegistry
from server.gc_freeze import frozen_heap
from tests.redis_server import RedisServer
from tests.server_process import running_server

# The default model's KV shape: 30 layers, 3 KV heads, head size 64.
LAYERS, HEADS, DIM = 30, 3, 64
DEFAULT_FINGERPRINT = ModelFingerprint("llama", LAYERS, HEADS, DIM, 49152)


def prefix_blob(p: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    return save({name: torch.randn(HEADS, p, DIM, generator=g) * 0.5 for name in names})


async def stream_one(
    client: httpx.AsyncClient, task: str, new_tokens: int, running: asyncio.Semaphore, all_running: asyncio.Event
) -> list[float]:
    prompt = "Tell me about the sea and the ships"
    # ignore_eos: every stream runs its full length, so 16 streams really are running during the burst.
    body = {"task_id": task, "prompt": prompt, "max_new_tokens": new_tokens, "stream": True, "ignore_eos": True}
    times: list[float] = []
    try:
        async with client.stream("POST", "/v1/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("token_id") is not None:
                    times.append(time.perf_counter())
                    if len(times) == 3:
                        await running.acquire()  # counts the streams that are decoding
                        if running.locked():
                            all_running.set()
    finally:
        if len(times) < 3:  # a stream that failed early must not hang the round
            all_running.set()
    return times


async def one_round(
    client: httpx.AsyncClient, streams: int, burst_tasks: list[str], new_tokens: int
) -> tuple[list[float], list[float]]:
    """ITL of the streams once every one of them is decoding (their own joins are not counted), with the burst
    sent at that moment; and each burst request's latency."""
    running, all_running = asyncio.Semaphore(streams), asyncio.Event()
    stream_tasks = [
        asyncio.create_task(stream_one(client, f"hot{i}", new_tokens, running, all_running)) for i in range(streams)
    ]
    burst_latency: list[float] = []
    await all_running.wait()
    since = time.perf_counter()

    async def burst_request(task: str) -> None:
        t0 = time.perf_counter()
        r = await client.post("/v1/generate", json={"task_id": task, "prompt": "Hi", "max_new_tokens": 1})
        r.raise_for_status()
        burst_latency.append(time.perf_counter() - t0)

    await asyncio.gather(*(burst_request(t) for t in burst_tasks))
    itl: list[float] = []
    for times in await asyncio.gather(*stream_tasks):
        itl.extend(b - a for a, b in itertools.pairwise(times) if a >= since)
    return itl, burst_latency


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def floor(args: argparse.Namespace, repeats: int = 5) -> None:
    """Decode step times at the streams' batch size and with the burst joined, and prefill stalls of burst rows.

    A step that also prefills costs a decode step plus the prefill; these times bound the ITL ratio from below.
    """
    from server.model_loading import load_model
    from server.runner import ModelRunner, NewRequest
    from server.sampling import SamplingParams

    model = load_model(None)
    runner = ModelRunner(model.model, model.num_layers, model.num_kv_heads, model.head_dim)
    g = torch.Generator().manual_seed(0)
    ids = itertools.count()

    def rows(n: int, prompt_len: int, prefix_len: int) -> list[NewRequest]:
        shape = (LAYERS, 2, HEADS, prefix_len, DIM)
        return [
            NewRequest(f"r{i}", [100 + i] * prompt_len, SamplingParams(), torch.randn(*shape, generator=g), f"p{i}")
            for i in (next(ids) for _ in range(n))
        ]

    def timed(fn: Callable[..., object], *a: object) -> float:
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for n in (args.streams, args.streams + args.burst):
            batch, _ = runner.prefill(rows(n, 8, args.hot_prefix_len))
            steps = [timed(runner.decode, batch) for _ in range(6)]
            times.setdefault(f"decode step, batch {n}", []).append(statistics.median(steps[1:]))
        for n in (1, 4, args.burst):
            stall = timed(runner.prefill, rows(n, 1, args.cold_prefix_len))
            times.setdefault(f"prefill of {n} burst rows", []).append(stall)
    for name, values in times.items():
        print(
            f"{name}: median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, "
            f"max {max(values) * 1000:.0f}, {repeats} runs)"
        )


def summarize(results: dict[str, list[float]], loads: list[float]) -> dict[str, object]:
    base = pct(results["none"], 0.99)
    return {
        "itl_ms": {
            k: {"p50": round(statistics.median(v) * 1000, 1), "p99": round(pct(v, 0.99) * 1000, 1)}
            for k, v in results.items()
        },
        "p99_ratio_cold_burst_vs_none": round(pct(results["cold"], 0.99) / base, 3),
        "p99_ratio_warm_burst_vs_none": round(pct(results["warm"], 0.99) / base, 3),
        "p99_ratio_hot_burst_vs_none": round(pct(results["hot"], 0.99) / base, 3),
        "cold_request_latency_s": {"p50": round(statistics.median(loads), 3), "p99": round(pct(loads, 0.99), 3)},
    }


async def run(urls: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    # This client's own full garbage collections (130-240 ms seen with torch loaded) would stall its reading of
    # every stream at once: what set-up made is frozen out of them (server/gc_freeze.py).
    with frozen_heap():
        return await _rounds(urls, args)


async def _rounds(urls: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    results = {name: {"none": [], "cold": [], "warm": [], "hot": []} for name in urls}
    loads: dict[str, list[float]] = {name: [] for name in urls}
    per_round: dict[str, list[dict[str, object]]] = {name: [] for name in urls}
    for url in urls.values():
        # Warm-up, not counted: in a fresh server's first round one decode step took ~290 ms against ~60-90
        # (traced; once per server, in no later round), and that step alone set the round's no-burst p99.
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            await one_round(client, args.streams, [], args.new_tokens)
    for r in range(args.rounds):
        for v, (name, url) in enumerate(urls.items()):
            async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
                this_round: dict[str, list[float]] = {}
                round_loads: list[float] = []
                for scenario in ("none", "cold", "warm", "hot"):
                    if scenario in ("cold", "warm"):
                        # Fresh cold tasks every round: nothing of theirs is resident anywhere yet. The warm
                        # burst sends them again, resident since the cold one.
                        burst = [f"cold-v{v}-{r}-{i}" for i in range(args.burst)]
                    elif scenario == "hot":
                        burst = [f"hot{i % args.streams}" for i in range(args.burst)]
                    else:
                        burst = []
                    itl, latency = await one_round(client, args.streams, burst, args.new_tokens)
                    this_round[scenario] = itl
                    results[name][scenario].extend(itl)
                    if scenario == "cold":
                        round_loads = latency
                        loads[name].extend(latency)
                per_round[name].append(summarize(this_round, round_loads))
                ratios = per_round[name][-1]
                print(
                    f"round {r} {name}: ITL p99 ms {[v['p99'] for v in ratios['itl_ms'].values()]} (none, cold, warm, "
                    f"hot); ratios cold {ratios['p99_ratio_cold_burst_vs_none']} warm "
                    f"{ratios['p99_ratio_warm_burst_vs_none']} hot {ratios['p99_ratio_hot_burst_vs_none']}",
                    flush=True,
                )
    out: dict[str, object] = {}
    for name in urls:
        summary = summarize(results[name], loads[name])
        summary["per_round_p99_ratio_cold"] = [x["p99_ratio_cold_burst_vs_none"] for x in per_round[name]]
        summary["per_round_p99_ratio_warm"] = [x["p99_ratio_warm_burst_vs_none"] for x in per_round[name]]
        summary["per_round_p99_ratio_hot"] = [x["p99_ratio_hot_burst_vs_none"] for x in per_round[name]]
        out[name] = summary
    return out


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The scenario's sizes; ``prefix`` ("s5-") names them inside `python -m bench`."""
    parser.add_argument(f"--{prefix}streams", type=int, default=16, help="running hot streams (default 16)")
    parser.add_argument(f"--{prefix}burst", type=int, default=16, help="cold requests sent at once (default 16)")
    parser.add_argument(f"--{prefix}rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(f"--{prefix}new-tokens", type=int, default=48, help="tokens per stream (default 48)")
    parser.add_argument(f"--{prefix}hot-prefix-len", type=int, default=10)
    parser.add_argument(f"--{prefix}cold-prefix-len", type=int, default=200)


SIZES = ("streams", "burst", "rounds", "new_tokens", "hot_prefix_len", "cold_prefix_len")


def measure(sizes: argparse.Namespace, variants: dict[str, str]) -> dict[str, object]:
    """Start Redis and one server per variant, upload the prefixes, run the rounds: a summary per variant.

    ``sizes`` has the fields named in ``SIZES``.
    """
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        redis_server = RedisServer(Path(tmp))
        redis_server.start()
        stack.callback(redis_server.stop)
        urls: dict[str, str] = {}
        for name, flags in variants.items():
            serve_args = ["--store", redis_server.url, "--max-batch-size", str(sizes.streams + sizes.burst)]
            server = stack.enter_context(running_server(serve_args + flag_list(flags), Path(tmp) / f"{name}.log"))
            urls[name] = server.url
        first = next(iter(urls.values()))
        with httpx.Client(base_url=first, timeout=120) as c:
            for i in range(sizes.streams):
                c.put(f"/v1/prefixes/hot{i}", content=prefix_blob(sizes.hot_prefix_len, i)).raise_for_status()
        for url in urls.values():  # every server loads the hot prefixes once: they are resident from now on
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(sizes.streams):
                    c.post("/v1/generate", json={"task_id": f"hot{i}", "prompt": "x", "max_new_tokens": 1})
        # Cold prefixes are written straight to Redis, as another replica would: these servers
        # have never seen them, so each burst request loads from Redis (host and device tiers miss).
        other_replica = PrefixRegistry(RedisBackend(redis_server.url), DEFAULT_FINGERPRINT)
        g = torch.Generator().manual_seed(1)
        for v in range(len(urls)):  # task ids by variant index: a variant's name may hold any character
            for r in range(sizes.rounds):
                for i in range(sizes.burst):
                    kv = torch.randn(LAYERS, 2, HEADS, sizes.cold_prefix_len, DIM, generator=g) * 0.5
                    other_replica.upload("default", f"cold-v{v}-{r}-{i}", kv)
        other_replica.backend.close()
        return asyncio.run(run(urls, sizes))


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    add_variant_option(
        parser,
        "--variant",
        "a server configuration, e.g. 'budget=--max-prefill-tokens 64' (repeatable; default: the defaults)",
    )
    parser.add_argument("--floor", action="store_true", help="only time decode steps and prefills in process")
    args = parser.parse_args()
    if args.floor:
        floor(args)
        return
    variants = parse_variants(args.variant) or {"default": ""}
    result = measure(args, variants)
    for name, flags in variants.items():
        print(f"{name} [{flags or 'defaults'}]")
        print(json.dumps(result[name], indent=2))


if __name__ == "__main__":
    main()
