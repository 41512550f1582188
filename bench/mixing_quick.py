"""In-process mixing benchmark on the default model (S1 without HTTP, issue 2's figures).

N concurrent greedy requests (prompt ~24 tokens, 64 new tokens) through the engine with the server's scheduler
defaults, three ways: every request with its own prefix, all sharing one prefix, and (unless skipped) the same
requests one at a time. The distinct and shared runs alternate ABBA, so drift on a shared machine hits both
alike; each adjacent pair also gives a ratio of its own.

    python -m bench.mixing_quick [--requests 1,4,16,32,64] [--new-tokens 64] [--prefix-len 10] [--repeats 2]
        [--skip-sequential]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

from server.config import ServeConfig
from server.engine import Engine, GenerationRequest
from server.model_loading import load_model
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.scheduler import SchedulerConfig

PROMPT = "Write a short note about the history of the city, its people, its rivers and its old bridges, please"


async def count_tokens(engine: Engine, request: GenerationRequest) -> int:
    return len([e async for e in engine.generate(request) if e.token_id is not None])


async def run_concurrent(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    counts = await asyncio.gather(*(count_tokens(engine, r) for r in requests))
    return time.perf_counter() - start, sum(counts)


async def run_sequential(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    for r in requests:
        total += await count_tokens(engine, r)
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", default="32", help="concurrency, or comma-separated concurrencies")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-sequential", action="store_true", help="no one-at-a-time run")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    concurrencies = [int(c) for c in args.requests.split(",")]

    model = load_model(None, device=args.device, dtype=args.dtype)
    prompt_ids = model.tokenizer(PROMPT).input_ids
    shape = (model.num_layers, 2, model.num_kv_heads, args.prefix_len, model.head_dim)
    gen = torch.Generator().manual_seed(0)
    prefixes = [torch.randn(shape, generator=gen) * 0.5 for _ in range(max(concurrencies))]
    # EOS is disabled so every request produces exactly --new-tokens tokens in every scenario.
    params = SamplingParams(max_new_tokens=args.new_tokens)

    runner = ModelRunner(model.model, model.num_layers, model.num_kv_heads, model.head_dim)
    serve = ServeConfig()  # the scheduler `prefix-serve serve` runs with: fused prompt chunks, KV groups
    engine = Engine(
        runner,
        model.tokenizer,
        eos_token_ids=[],
        max_context=model.max_context,
        config=SchedulerConfig(
            max_batch_size=max(concurrencies),
            max_queue=4 * max(concurrencies),
            max_prefill_tokens=serve.max_prefill_tokens,
            prefill_chunk_tokens=serve.prefill_chunk_tokens,
            kv_groups=serve.kv_groups,
        ),
    )
    engine.start()

    async def measure(n: int) -> dict[str, list[float]]:
        distinct = [GenerationRequest(prompt_ids, params, kv, f"t{i}") for i, kv in enumerate(prefixes[:n])]
        shared = [GenerationRequest(prompt_ids, params, prefixes[0], "t0") for _ in range(n)]
        await run_concurrent(engine, distinct[:4])  # warm-up
        rates: dict[str, list[float]] = {"distinct": [], "shared": []}
        for r in range(args.repeats):
            order = (("distinct", distinct), ("shared", shared))
            for name, reqs in order if r % 2 == 0 else reversed(order):  # ABBA: drift hits both alike
                seconds, tokens = await run_concurrent(engine, reqs)
                rates[name].append(tokens / seconds)
                rate = tokens / seconds
                print(f"{n:>3} {name:>9}: {tokens} tokens in {seconds:.1f} s = {rate:.1f} tok/s", flush=True)
        if not args.skip_sequential:
            seconds, tokens = await run_sequential(engine, distinct)
            rates["one_at_a_time"] = [tokens / seconds]
            print(f"one-at-a-time: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
        return rates

    results = []
    try:
        for n in concurrencies:
            rates = asyncio.run(measure(n))
            pairs = [d / s for d, s in zip(rates["distinct"], rates["shared"], strict=True)]
            ratio = statistics.median(rates["distinct"]) / statistics.median(rates["shared"])
            row = {
                "requests": n,
                "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                "distinct_over_shared": round(ratio, 3),
                "distinct_over_shared_per_pair": [round(x, 3) for x in pairs],
            }
            if "one_at_a_time" in rates:
                row["distinct_over_one_at_a_time"] = round(
                    statistics.median(rates["distinct"]) / rates["one_at_a_time"][0], 2
                )
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.shutdown()
    print(
        json.dumps(
            {
                "model": model.name,
                "device": str(model.device),
                "dtype": str(model.dtype),
                "prompt_tokens": len(prompt_ids),
                "new_tokens": args.new_tokens,
                "prefix_len": args.prefix_len,
                "repeats": args.repeats,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
