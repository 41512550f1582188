"""What penalties and logit biases cost a sampling call, side by side, in process.

    python -m bench.logit_adjustments [--vocab 49152] [--rounds 3]

For batches of 1-64 rows of random logits (the default model's vocabulary), the median time of ``sample`` with no
row adjusting its logits, with one row asking for a presence penalty, and with every row asking for repetition
and presence penalties and a logit bias; the three take turns, ``--rounds`` times, and the best median of each is
reported with the extra over the plain call. A decode step of the default model takes ~20 ms at 1 row and ~50 ms
at 32 on the 2-core CI machine (bench/decode_step.py), for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import log
from server.sampling import SamplingBatch, SamplingParams, sample
from server.threads import ENGINE_TORCH_THREADS, pin_torch_threads, release_openmp_pool


def median_ms(logits: torch.Tensor, batch: SamplingBatch, calls: int = 200) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sample(logits, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    release_openmp_pool()  # one OpenMP pool, pinned as in the engine thread (server/threads.py)
    pin_torch_threads(ENGINE_TORCH_THREADS)
    cpu = torch.device("cpu")
    everything = SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, logit_bias=((7, 2.0), (11, -5.0)))
    log(f"sample() on [B, {args.vocab}] logits, ms (best of {args.rounds} medians):")
    for rows in (1, 16, 32, 64):
        logits = torch.randn(rows, args.vocab)
        prompts = [list(range(100, 140))] * rows  # 40 prompt tokens per row, seen by the repetition penalty
        batches = {
            "plain": SamplingBatch.from_params([SamplingParams()] * rows, cpu, prompts),
            "one row": SamplingBatch.from_params(
                [SamplingParams(presence_penalty=0.5)] + [SamplingParams()] * (rows - 1), cpu, prompts
            ),
            "every row": SamplingBatch.from_params([everything] * rows, cpu, prompts),
        }
        for batch in batches.values():
            sample(logits, batch)  # the first call makes the adjustments' state
        medians: dict[str, list[float]] = {name: [] for name in batches}
        for _ in range(args.rounds):  # the variants take turns: the machine is noisy
            for name, batch in batches.items():
                medians[name].append(median_ms(logits, batch))
        best = {name: min(values) for name, values in medians.items()}
        base = best["plain"]
        log(
            f"  {rows:>2} rows: plain {base:.3f}; one row adjusted {best['one row']:.3f} "
            f"(+{best['one row'] - base:.3f}); every row {best['every row']:.3f} (+{best['every row'] - base:.3f})"
        )


if __name__ == "__main__":
    main()
