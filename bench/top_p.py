"""What looking for top-p heads among the likeliest candidates saves against sorting whole rows, side by side.

    python -m bench.top_p [--rounds 3] [--batch 32] [--new-tokens 64]

1. A sampling call (temperature 0.8, top-p 0.95) on the default model's real logits (every position of four short
   texts), at 1, 8 and 32 rows: ``TRUNCATION_CANDIDATES`` as shipped against the whole vocabulary (which is
   sorting every row, as before), median of 25 calls each.
2. Served in process (engine with the server's CPU defaults, speculation off): ``--batch`` requests of 32 random
   prompt tokens, sampled the same way, ``--new-tokens`` each with EOS ignored; tokens/s each way, the two taking
   turns ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import log
from bench.inproc import cpu_served_engine, random_prompts
from bench.prompt_cache import run
from server import sampling
from server.engine import GenerationRequest
from server.model_loading import load_model
from server.sampling import SamplingBatch, SamplingParams, sample

TEXTS = [
    "Why is the sky blue? Because",
    "Here are three tips for learning to cook: 1.",
    "A hash table is a data structure that",
    "Once upon a time, in a small village,",
]
PARAMS = SamplingParams(temperature=0.8, top_p=0.95)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    loaded = load_model(None)
    assert loaded.tokenizer is not None
    shipped = sampling.TRUNCATION_CANDIDATES
    with torch.inference_mode():
        logits = torch.cat(
            [loaded.model(input_ids=loaded.tokenizer(t, return_tensors="pt").input_ids).logits[0] for t in TEXTS]
        ).float()  # [positions, V]
    vocab = logits.shape[1]
    for rows in (1, 8, 32):
        x = logits[:rows]
        times: dict[int, list[float]] = {vocab: [], shipped: []}
        for _ in range(25):
            for candidates in times:
                sampling.TRUNCATION_CANDIDATES = candidates
                batch = SamplingBatch.from_params([PARAMS] * rows, torch.device("cpu"))
                start = time.perf_counter()
                sample(x, batch)
                times[candidates].append(time.perf_counter() - start)
        whole, among = statistics.median(times[vocab]) * 1e3, statistics.median(times[shipped]) * 1e3
        log(f"sampling call, {rows} rows: whole rows sorted {whole:.2f} ms, among {shipped} candidates {among:.2f} ms")
    engine = cpu_served_engine(loaded, args.batch)
    engine.start()
    rates: dict[int, list[float]] = {vocab: [], shipped: []}
    try:
        for round_ in range(args.rounds):
            prompts = random_prompts(args.batch, 32, vocab, seed=round_)
            for candidates in rates:
                sampling.TRUNCATION_CANDIDATES = candidates
                params = [
                    SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=0.8, top_p=0.95, seed=i)
                    for i in range(args.batch)
                ]
                rate, _ = run(engine, [GenerationRequest(p, q) for p, q in zip(prompts, params, strict=True)])
                rates[candidates].append(rate)
    finally:
        engine.shutdown()
        sampling.TRUNCATION_CANDIDATES = shipped
    whole, among = statistics.median(rates[vocab]), statistics.median(rates[shipped])
    log(
        f"served, {args.batch} sampled streams: whole rows sorted {whole:.1f} tok/s, among candidates {among:.1f} "
        f"({among / whole:.2f}x; per round {[round(r, 1) for r in rates[vocab]]} vs "
        f"{[round(r, 1) for r in rates[shipped]]})"
    )


if __name__ == "__main__":
    main()
