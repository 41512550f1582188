"""Shared pieces of `python -m bench`: the server, prefix uploads, load drivers and the results folder."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save

# The default model's KV shape: 30 layers, 3 KV heads, head size 64.
LAYERS, HEADS, DIM = 30, 3, 64
PROMPT = "Write a short note about the history of the city, its people, its rivers and its old bridges, please"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prefix_blob(p: int, seed: int) -> bytes:
    """A native safetensors prefix of random values in the default model's KV shape."""
    g = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    return save({name: torch.randn(HEADS, p, DIM, generator=g) * 0.5 for name in names})


@contextmanager
def server_url(url: str | None, work: Path, serve_args: Sequence[str]) -> Iterator[str]:
    """``url`` when given, else a fresh `prefix-serve serve` (default model, disk store under ``work``)."""
    if url is not None:
        yield url.rstrip("/")
        return
    from tests.server_process import running_server

    with tempfile.TemporaryDirectory(prefix="bench-store-") as store:  # thousands of prefixes: not in results/
        args = ["--store", f"disk://{store}", *serve_args]
        log(f"starting prefix-serve serve {' '.join(args)}")
        with running_server(args, work.resolve() / "server.log") as server:
            log(f"server up at {server.url}")
            SERVER_PIDS[server.url] = server.proc.pid
            try:
                yield server.url
            finally:
                SERVER_PIDS.pop(server.url, None)


# url -> pid of the servers server_url started, so a scenario can read their memory from /proc.
SERVER_PIDS: dict[str, int] = {}


def server_memory(url: str) -> dict[str, int] | None:
    """The server's current and peak resident set (VmRSS, VmHWM) in bytes; None when we did not start it."""
    pid = SERVER_PIDS.get(url)
    if pid is None:
        return None
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # reported in kB
    return {"rss_bytes": fields["VmRSS"], "peak_rss_bytes": fields["VmHWM"]}


def scrape(url: str) -> dict[str, float]:
    """The server's own samples on /metrics (prefix_serve_*), keyed by name with labels as written."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(prefix_serve_[a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=url, timeout=600, limits=limits)


async def upload_prefixes(c: httpx.AsyncClient, names: Sequence[str], prefix_len: int, parallel: int = 8) -> None:
    """PUT a distinct random native prefix for each name (skipped when the server already has it)."""
    sem = asyncio.Semaphore(parallel)
    done = 0

    async def one(i: int, name: str) -> None:
        nonlocal done
        async with sem:
            blob = await asyncio.to_thread(prefix_blob, prefix_len, i)
            r = await c.put(f"/v1/prefixes/{name}", content=blob, headers={"content-type": "application/octet-stream"})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"upload {name}: {r.status_code} {r.text}")
            done += 1
            if done % 100 == 0 or done == len(names):
                log(f"  uploaded {done}/{len(names)} prefixes")

    await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))


async def generate(c: httpx.AsyncClient, task: str | None, new_tokens: int, prompt: str = PROMPT) -> int:
    body = {"task_id": task, "prompt": prompt, "max_new_tokens": new_tokens, "ignore_eos": True}
    r = await c.post("/v1/generate", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"generate {task}: {r.status_code} {r.text}")
    return int(r.json()["usage"]["completion_tokens"])


@dataclass
class Run:
    seconds: float
    tokens: int
    requests: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def closed_loop(c: httpx.AsyncClient, tasks: Sequence[str | None], new_tokens: int, concurrency: int) -> Run:
    """Send one request per entry of ``tasks``, at most ``concurrency`` in flight; wall time to the last."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    for t in tasks:
        queue.put_nowait(t)
    total = 0

    async def worker() -> None:
        nonlocal total
        while True:
            try:
                task = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            tokens = await generate(c, task, new_tokens)  # not `total += await ...`: that loses updates
            total += tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(tasks)))))
    return Run(time.perf_counter() - start, total, len(tasks))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def environment() -> dict[str, Any]:
    import transformers

    import server

    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    import os

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prefix_serve": getattr(server, "__version__", "dev"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


@dataclass
class Report:
    """Results of one `python -m bench` invocation, written into bench/results/<timestamp>/."""

    out: Path
    data: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)

    @classmethod
    def create(cls, out: Path | None) -> Report:
        path = out or RESULTS_ROOT / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, {"environment": environment()})

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((title, header, rows))
        print("\n" + markdown_table(title, header, rows), flush=True)

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        env = self.data["environment"]
        lines = ["# Benchmark results", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
        for title, header, rows in self.tables:
            lines += [markdown_table(title, header, rows), ""]
        (self.out / "results.md").write_text("\n".join(lines))
        log(f"wrote {self.out}/results.json and results.md")


def markdown_table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))

    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def plot(out: Path, name: str, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]]) -> None:
    """A line plot per series into ``out/name.png``; skipped with a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib not installed: skipping {name}.png (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
