"""Decode steps of the default model on the CPU with q/k/v and gate/up fused into one matmul each (the default
where linear layers run on oneDNN: server/fused_projections.py) against the model's own layers, in process.

    python -m bench.projections [--batches 1,16,32] [--rounds 40]

Two copies of the default model, each behind its own runner; rows of S3-like lengths with random K/V (as in
bench/decode_step.py); the two take turns step by step and the median step time of each is reported.
"""

from __future__ import annotations

import argparse
import os
import random

from bench.decode_step import interleaved_ms, random_batch
from bench.harness import log
from bench.traffic import log_uniform_int


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,32")
    p.add_argument("--rounds", type=int, default=40, help="steps timed per variant, variants taking turns")
    args = p.parse_args()

    from server.fused_projections import fused_modules
    from server.model_loading import load_model
    from server.runner import ModelRunner
    from server.threads import ENGINE_TORCH_THREADS, pin_torch_threads, release_openmp_pool

    fused_model, stock_model = load_model(None), load_model(None)
    release_openmp_pool()  # this thread's pool is the only one, as in the engine (server/threads.py)
    pin_torch_threads(ENGINE_TORCH_THREADS)
    shape = (fused_model.num_layers, fused_model.num_kv_heads, fused_model.head_dim)
    fused = ModelRunner(fused_model.model, *shape)  # the default
    stock = ModelRunner(stock_model.model, *shape, fuse_projections=False)
    log(f"fused modules: {len(fused_modules(fused_model.model))} vs {len(fused_modules(stock_model.model))}")
    rng = random.Random(0)
    for b in (int(x) for x in args.batches.split(",")):
        lengths = [10 + log_uniform_int(rng, 8, 500) + rng.randint(0, 128) for _ in range(b)]
        rows_fused, rows_stock = random_batch(lengths, fused_model, "f"), random_batch(lengths, stock_model, "s")
        ms = interleaved_ms(
            {
                "fused": lambda rows=rows_fused: fused.decode(rows),
                "stock": lambda rows=rows_stock: stock.decode(rows),
            },
            args.rounds,
        )
        log(f"batch {b}: fused {ms['fused']:.2f} ms, stock {ms['stock']:.2f} ms = {ms['fused'] / ms['stock']:.3f}x")


if __name__ == "__main__":
    main()
