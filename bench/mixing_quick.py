"""Quick mixing benchmark on the default model (issue 2's figures).

32 concurrent greedy requests (prompt ~24 tokens, 64 new tokens) through the engine, three ways:
every request with its own prefix, all sharing one prefix, and the same requests one at a time.
The mixed and shared runs alternate (ABAB...) so drift on a shared machine hits both alike.

    python -m bench.mixing_quick [--requests 32] [--new-tokens 64] [--prefix-len 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

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
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model = load_model(None, device=args.device, dtype=args.dtype)
    prompt_ids = model.tokenizer(PROMPT).input_ids
    shape = (model.num_layers, 2, model.num_kv_heads, args.prefix_len, model.head_dim)
    gen = torch.Generator().manual_seed(0)
    prefixes = [torch.randn(shape, generator=gen) * 0.5 for _ in range(args.requests)]
    # EOS is disabled so every request produces exactly --new-tokens tokens in every scenario.
    params = SamplingParams(max_new_tokens=args.new_tokens)
    distinct = [GenerationRequest(prompt_ids, params, kv, f"t{i}") for i, kv in enumerate(prefixes)]
    shared = [GenerationRequest(prompt_ids, params, prefixes[0], "t0") for _ in range(args.requests)]

    runner = ModelRunner(model.model, model.num_layers, model.num_kv_heads, model.head_dim)
    engine = Engine(
        runner,
        model.tokenizer,
        eos_token_ids=[],
        max_context=model.max_context,
        config=SchedulerConfig(max_batch_size=args.requests, max_queue=4 * args.requests),
    )
    engine.start()

    async def measure() -> dict[str, list[float]]:
        await run_concurrent(engine, distinct[:4])  # warm-up
        rates: dict[str, list[float]] = {"distinct": [], "shared": []}
        for _ in range(args.repeats):
            for name, reqs in (("distinct", distinct), ("shared", shared)):
                seconds, tokens = await run_concurrent(engine, reqs)
                rates[name].append(tokens / seconds)
                print(f"{name:>9}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
        seconds, tokens = await run_sequential(engine, distinct)
        rates["one_at_a_time"] = [tokens / seconds]
        print(f"one-at-a-time: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
        return rates

    try:
        rates = asyncio.run(measure())
    finally:
        engine.shutdown()
    distinct_rate = statistics.median(rates["distinct"])
    shared_rate = statistics.median(rates["shared"])
    sequential_rate = rates["one_at_a_time"][0]
    result = {
        "model": model.name,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "requests": args.requests,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "prefix_len": args.prefix_len,
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "distinct_over_shared": round(distinct_rate / shared_rate, 3),
        "distinct_over_one_at_a_time": round(distinct_rate / sequential_rate, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
