"""Prefix store figures (issue 3): cold load latency, a 10,000-prefix Redis, host memory per resident prefix.

Prefixes have the default model's shape (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32); the
model itself is not loaded. A cold load is `PrefixRegistry.resolve` with an empty host cache: ask the
backend for the latest version, read the blob, verify its sha256 and fingerprint, build the
[L, 2, H_kv, P, d] tensor (on CPU that tensor is "device-ready"). Disk figures are with a warm page cache.

Starts its own redis-server on a free loopback port unless --redis-url is given (the database is flushed;
a redis+cluster:// URL flushes every primary of the cluster).

    python -m bench.store_latency [--samples 200] [--many 10000] [--resident 2000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import torch

from prefix_store.backends import DiskBackend, PrefixBackend, RedisBackend
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.piecewise import DEFAULT_PIECE_BYTES
from prefix_store.registry import PrefixRegistry

FP = ModelFingerprint("llama", 30, 3, 64, 49152)  # the default model's cache shape
TENANT = "bench"


def make_kv(p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(FP.num_layers, 2, FP.num_kv_heads, p, FP.head_dim, generator=g)  # [L, 2, H, P, d]


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*args, "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


def used_memory(client: redis.Redis | redis.RedisCluster) -> int:
    """Redis's used_memory, summed over a cluster's nodes (INFO there answers per node)."""
    if isinstance(client, redis.RedisCluster):
        per_node = client.info("memory", target_nodes=redis.RedisCluster.PRIMARIES)
        return sum(int(node_info["used_memory"]) for node_info in per_node.values())
    return int(client.info("memory")["used_memory"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cold_load_ms(
    backend: PrefixBackend, p: int, tasks: int, samples: int, piece_sizes: list[int]
) -> dict[int, list[float]]:
    """Latencies (ms) of `samples` cold resolves spread over `tasks` stored prefixes of P=`p`, per load piece size
    (`PrefixRegistry(load_piece_bytes=...)`; 0 reads blobs whole), the sizes alternating sample by sample."""
    writer = PrefixRegistry(backend, FP, host_cache_bytes=0)
    for i in range(tasks):
        writer.upload(TENANT, f"p{p}-{i}", make_kv(p, seed=i))
    # No host cache and no reuse of the latest-version answer: every resolve goes to the backend.
    readers = {
        size: PrefixRegistry(backend, FP, host_cache_bytes=0, latest_ttl=0.0, load_piece_bytes=size)
        for size in piece_sizes
    }
    out: dict[int, list[float]] = {size: [] for size in piece_sizes}
    for reader in readers.values():
        reader.resolve(TENANT, f"p{p}-0")  # warm-up (imports, connection)
    for i in range(samples):
        for size, reader in readers.items():
            started = time.perf_counter()
            art = reader.resolve(TENANT, f"p{p}-{i % tasks}")
            out[size].append((time.perf_counter() - started) * 1e3)
            assert art.key_values.shape[3] == p
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss() -> int:
    """RSS after a GC and returning freed heap to the OS, so it counts live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200, help="cold loads per backend and P")
    parser.add_argument("--tasks", type=int, default=50, help="distinct prefixes the cold loads cycle over")
    parser.add_argument("--many", type=int, default=10_000, help="prefixes registered in one Redis")
    parser.add_argument("--resident", type=int, default=2000, help="prefixes made host-resident for the memory figure")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument(
        "--piece-bytes", default=f"{DEFAULT_PIECE_BYTES},0", help="load piece sizes to compare (0 = whole blobs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(redis_server())
        backend = RedisBackend(url)
        stack.callback(backend.close)
        backend.client.flushdb()  # on a cluster: every primary
        disk_root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        disk = DiskBackend(disk_root)

        print(f"cold load latency, ms ({args.samples} resolves over {args.tasks} prefixes each; disk page cache warm)")
        for p in (10, 200):
            nbytes = make_kv(p, 0).numel() * 4
            for name, b in (("redis", backend), ("disk", disk)):
                piece_sizes = [int(x) for x in args.piece_bytes.split(",")]
                for size, ms in cold_load_ms(b, p, args.tasks, args.samples, piece_sizes).items():
                    pieces = f"pieces of {size / 2**20:g} MiB" if size else "whole"
                    print(
                        f"  {name:5s} P={p:<3d} ({nbytes / 2**20:5.2f} MiB, {pieces}): "
                        f"p50 {statistics.median(ms):7.2f}  p99 {percentile(ms, 0.99):7.2f}  max {max(ms):7.2f}"
                    )
        shutil.rmtree(disk_root, ignore_errors=True)

        backend.client.flushdb()
        writer = PrefixRegistry(backend, FP, host_cache_bytes=0)
        kv = make_kv(10, seed=1)
        started = time.perf_counter()
        for i in range(args.many):
            writer.upload(TENANT, f"task-{i:05d}", kv)
        elapsed = time.perf_counter() - started
        used = used_memory(backend.client)
        print(f"{args.many} prefixes (P=10, {kv.numel() * 4} tensor bytes each) in one Redis:")
        print(f"  upload rate: {args.many / elapsed:.0f} prefixes/s ({elapsed:.1f} s, 1 thread)")
        print(f"  redis used_memory: {used / 2**30:.2f} GiB ({used / args.many / (kv.numel() * 4):.3f}x tensor bytes)")
        started = time.perf_counter()
        names = backend.list_tasks(TENANT)
        t_ids = time.perf_counter() - started
        lister = PrefixRegistry(backend, FP)
        started = time.perf_counter()
        listing = lister.list(TENANT)
        t_list = time.perf_counter() - started
        started = time.perf_counter()
        again = lister.list(TENANT)  # the same headers: their parses are reused
        t_again = time.perf_counter() - started
        assert len(names) == len(listing) == args.many and again == listing
        print(f"  listing task ids: {t_ids * 1e3:.0f} ms (backend.list_tasks: SSCAN + pipelined EXISTS)")
        print(f"  listing with metadata: {t_list * 1e3:.0f} ms (registry.list, cold: the latest headers, batched)")
        print(f"  listing with metadata again: {t_again * 1e3:.0f} ms (headers read again, parses reused)")

        # Host memory of resident prefixes: RSS growth while the registry's host cache fills.
        n = args.resident
        tensor_bytes = kv.numel() * 4
        reader = PrefixRegistry(backend, FP, host_cache_bytes=(n + 1) * tensor_bytes)
        before = trimmed_rss()
        for i in range(n):
            reader.resolve(TENANT, f"task-{i:05d}")
        after = trimmed_rss()
        assert reader.stats()["host_cache_entries"] == n
        arts = [reader.resolve(TENANT, f"task-{i:05d}") for i in range(n)]
        objects = sum(sys.getsizeof(a) + sys.getsizeof(a.metadata) + sys.getsizeof(a.key_values) for a in arts)
        storage = sum(a.key_values.untyped_storage().nbytes() for a in arts)
        per = (after - before) / n
        print(f"host memory per resident prefix ({n} resident, P=10, {tensor_bytes} tensor bytes each):")
        print(f"  RSS delta {per:.0f} B/prefix = {per / tensor_bytes - 1:+.1%} over tensor bytes")
        print(
            f"  accounted: tensor storage {storage / n:.0f} B + python objects {objects / n:.0f} B "
            f"= {(storage + objects) / n / tensor_bytes - 1:+.2%} over tensor bytes"
        )
        backend_name = backend.describe()
        print(f"({backend_name}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
