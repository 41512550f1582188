"""One decode step of the default model, in process, side by side: one padded batch vs KV groups.

    python -m bench.decode_step [--batch 32] [--rounds 12]

Rows hold random K/V (attention reads them whatever their values), so no prefill is needed. Reports the median
time of a decode step, the variants taking turns step by step, for rows of S3-like lengths (prefix 10 +
log-uniform prompt 8-500 + up to 128 generated tokens): one padded batch (the plain decode step) vs 1, 2, 4
and 8 groups of similar lengths in one fused forward (server/kv_groups.py), with each layout's padded share.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bench.harness import log
from bench.traffic import log_uniform_int
from server.batch import Batch, RowInfo
from server.model_loading import LoadedModel
from server.sampling import SamplingBatch, SamplingParams


def random_batch(lengths: Sequence[int], model: LoadedModel, tag: str) -> Batch:
    """Rows of the given real lengths, left-padded, with random K/V."""

    n, width = len(lengths), max(lengths)
    capacity = width + 256  # room for the timed steps, so no buffer grows inside a measurement
    mask = torch.zeros(n, width, dtype=torch.int64)
    for i, length in enumerate(lengths):
        mask[i, width - length :] = 1
    shape = (n, model.num_kv_heads, capacity, model.head_dim)
    return Batch(
        rows=[RowInfo(f"{tag}{i}", None, 0) for i in range(n)],
        keys=[torch.randn(shape) * 0.1 for _ in range(model.num_layers)],
        values=[torch.randn(shape) * 0.1 for _ in range(model.num_layers)],
        attention_mask=mask,
        next_positions=torch.tensor(list(lengths)),
        next_input_ids=torch.randint(100, 1000, (n,)),
        sampling=SamplingBatch.from_params([SamplingParams()] * n, torch.device("cpu")),
    )


def interleaved_ms(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms per step of each variant, the variants taking turns step by step (the machine is noisy)."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _groups(lengths: Sequence[int], count: int) -> list[list[int]]:
    """Sorted lengths cut into ``count`` runs of equal size (what the placement tends to: similar lengths)."""
    ordered = sorted(lengths)
    size = -(-len(ordered) // count)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=12, help="steps timed per variant, variants taking turns")
    args = p.parse_args()

    from server.model_loading import load_model
    from server.runner import ModelRunner
    from server.threads import ENGINE_TORCH_THREADS, pin_torch_threads, release_openmp_pool

    model = load_model(None)
    release_openmp_pool()  # this thread's pool is the only one, as in the engine (server/threads.py)
    pin_torch_threads(ENGINE_TORCH_THREADS)
    runner = ModelRunner(model.model, model.num_layers, model.num_kv_heads, model.head_dim)
    b = args.batch

    rng = random.Random(0)
    lengths = [10 + log_uniform_int(rng, 8, 500) + rng.randint(0, 128) for _ in range(b)]
    real = sum(lengths)
    one = random_batch(lengths, model, "o")
    steps: dict[str, Callable[[], object]] = {"one padded batch": lambda: runner.decode(one)}
    shares = {"one padded batch": 1 - real / (b * max(lengths))}
    for count in (1, 2, 4, 8):
        groups = [random_batch(g, model, f"g{count}-{i}-") for i, g in enumerate(_groups(lengths, count))]
        name = f"{count} group(s), fused forward"
        steps[name] = lambda groups=groups: runner.fused_step(groups, [])
        shares[name] = 1 - real / sum(len(g) * g.width for g in groups)
    ms = interleaved_ms(steps, args.rounds)
    base = ms["one padded batch"]
    log(f"batch {b} of S3-like lengths ({min(lengths)}-{max(lengths)} columns), step ms and speed-up:")
    for name, value in ms.items():
        log(f"  {name:<28} padded share {shares[name]:.2f}: {value:6.1f} ms = {base / value:.2f}x")


if __name__ == "__main__":
    main()
