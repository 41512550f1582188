"""Torch's CPU allocations in transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``) against 4 KiB pages, side by side.

    python -m bench.hugepages [--batches 1,16] [--rounds 30]

Torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so each variant is its own process: two
workers load the default model behind a runner (as the server does: fused projections on oneDNN), then take
turns, one at a time, at the same work:

- decode steps of rows of S3-like lengths with random K/V (bench/decode_step.py's batches), median ms;
- loading a P = 200 prefix (9.2 MB) from a blob in memory, in 2 MiB pieces, hashed and copied into a fresh
  tensor as the registry does (prefix_store/piecewise.py), median ms: the copying is what fresh pages cost;
- growing a batch of 16 rows by 64 columns (new KV buffers, every row copied), median ms.

It ends with each worker's resident memory and how much of it is in huge pages.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

VARIANTS = {"huge pages": "1", "4 KiB pages": "0"}


def _memory_kib() -> tuple[int, int]:
    """(resident KiB, of which anonymous huge pages) of this process."""
    smaps = Path("/proc/self/smaps_rollup").read_text()
    rss = int(re.search(r"^Rss:\s+(\d+)", smaps, re.M).group(1))
    huge = int(re.search(r"^AnonHugePages:\s+(\d+)", smaps, re.M).group(1))
    return rss, huge


def _worker(conn: Connection, batches: list[int]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.decode_step import random_batch
    from bench.traffic import log_uniform_int
    from prefix_store.artifact import encode_artifact
    from prefix_store.backends.base import WholeBlobReader
    from prefix_store.piecewise import FIRST_READ_BYTES, read_artifact
    from server.model_loading import load_model
    from server.runner import ModelRunner
    from server.threads import ENGINE_TORCH_THREADS, pin_torch_threads, release_openmp_pool

    model = load_model(None)
    release_openmp_pool()
    pin_torch_threads(ENGINE_TORCH_THREADS)
    runner = ModelRunner(model.model, model.num_layers, model.num_kv_heads, model.head_dim)
    rng = random.Random(0)
    work: dict[str, Callable[[], object]] = {}
    for b in batches:
        lengths = [10 + log_uniform_int(rng, 8, 500) + rng.randint(0, 128) for _ in range(b)]
        rows = random_batch(lengths, model, f"b{b}-")
        work[f"decode step, batch {b}"] = lambda rows=rows: runner.decode(rows)
    prefix = torch.randn(model.num_layers, 2, model.num_kv_heads, 200, model.head_dim)
    blob = encode_artifact(prefix, task_id="t", tenant="default", version=1, fingerprint=model.fingerprint)
    work["P = 200 prefix load"] = lambda: read_artifact(WholeBlobReader(blob, FIRST_READ_BYTES))
    cache = [torch.randn(16, model.num_kv_heads, 300, model.head_dim) for _ in range(2 * model.num_layers)]

    def grow() -> list[torch.Tensor]:
        grown = []
        for t in cache:  # what a batch's growth does: new buffers with room, the old columns copied in
            new = torch.empty(16, model.num_kv_heads, 364, model.head_dim)
            new[:, :, :300].copy_(t)
            grown.append(new)
        return grown

    work["16 rows grown by 64 columns"] = grow
    for fn in work.values():
        fn()  # warm-up
    conn.send(list(work))
    while (message := conn.recv()) is not None:
        name, repeats = message
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work[name]()
            times.append(time.perf_counter() - start)
        conn.send(times)
    conn.send(_memory_kib())


def main() -> None:
    from bench.harness import log

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--rounds", type=int, default=30, help="turns per variant; each turn runs the work 3 times")
    args = p.parse_args()
    batches = [int(x) for x in args.batches.split(",")]

    spawn = mp.get_context("spawn")
    workers: dict[str, tuple[mp.Process, Connection]] = {}
    for name, value in VARIANTS.items():
        os.environ["THP_MEM_ALLOC_ENABLE"] = value  # inherited by the spawned interpreter before torch loads
        ours, theirs = spawn.Pipe()
        process = spawn.Process(target=_worker, args=(theirs, batches), daemon=True)
        process.start()
        theirs.close()  # so a worker that dies is an EOFError here, not a wait forever
        workers[name] = (process, ours)
        names = ours.recv()  # wait until it is set up, so the two never load at once
    times = {variant: {name: [] for name in names} for variant in VARIANTS}
    for _ in range(args.rounds):
        for name in names:
            for variant, (_, conn) in workers.items():
                conn.send((name, 3))
                times[variant][name] += conn.recv()
    memory = {}
    for variant, (process, conn) in workers.items():
        conn.send(None)
        memory[variant] = conn.recv()
        process.join()

    huge, small = VARIANTS
    log(f"median ms, {huge} vs {small} ({args.rounds} turns of 3 each, taking turns):")
    for name in names:
        a, b = (statistics.median(times[v][name]) * 1e3 for v in (huge, small))
        log(f"  {name:<28} {a:7.2f} vs {b:7.2f} = {a / b:.3f}x")
    for variant, (rss, in_huge) in memory.items():
        log(f"  {variant}: resident {rss / 1024:.0f} MiB, {in_huge / 1024:.0f} MiB of it in huge pages")


if __name__ == "__main__":
    main()
