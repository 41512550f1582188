"""Fair admission under a flood: tenant A sends 200 requests at once while tenant B sends 5, one after another.

Reports B's median latency (a) alone on an idle server, (b) during A's flood
with B as its own tenant (round-robin admission), and (c) during the same flood
with B's requests filed under A's tenant, which is what first-come-first-served
admission would give it. The target: (b) within 2x of (a).

B's requests start 2 s into the flood, one every --b-interval seconds, each measured from its own start. They
are streamed, so each round also reports B's time to first token (waiting for a row and the prompt's prefill)
and its inter-token latency (the steps it rode in). With --variant NAME=FLAGS (repeatable) one server per
variant runs side by side and the rounds alternate between them, so their ratios are compared under the same
load on a shared machine. Runs `prefix-serve serve` as a separate process (so the load generator does not share
its GIL), without API keys; the tenant is chosen per request with the X-Prefix-Serve-Tenant header (the keyless
caller is admin).

    python -m bench.fairness [--model PATH] [--flood 200] [--max-new-tokens 16] [--max-batch-size 16]
        [--rounds 2] [--variant 'reserve=--reserved-rows 1' ...]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.variants import add_variant_option, flag_list, parse_variants

TENANT_HEADER = "X-Prefix-Serve-Tenant"


def _serve(args: argparse.Namespace, store: str, flags: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(sys.executable).with_name("prefix-serve")
    cmd = [str(script) if script.exists() else shutil.which("prefix-serve") or "prefix-serve", "serve"]
    cmd += ["--port", str(port), "--store", f"disk://{store}", "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--max-queue", str(max(256, args.flood + 16)), "--log-level", "warning", *flags]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def _body(i: int, tokens: int) -> dict[str, object]:
    return {"prompt": f"Request {i}: tell me about the sea.", "max_new_tokens": tokens}


async def _one(client: httpx.AsyncClient, tenant: str, i: int, tokens: int) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/generate", json=_body(i, tokens), headers={TENANT_HEADER: tenant})
    r.raise_for_status()
    return time.perf_counter() - started


async def _one_streamed(client: httpx.AsyncClient, tenant: str, i: int, tokens: int) -> tuple[float, float]:
    """B's request, streamed: (latency, time to first token), to tell waiting and prefill from decode steps."""
    started = time.perf_counter()
    first: float | None = None
    body = {**_body(i, tokens), "stream": True}
    async with client.stream("POST", "/v1/generate", json=body, headers={TENANT_HEADER: tenant}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - started
    return time.perf_counter() - started, first if first is not None else math.nan


def _b_summary(b: list[tuple[float, float]], tokens: int) -> dict[str, float]:
    return {
        "b_median_s": statistics.median(t for t, _ in b),
        "b_ttft_median_s": statistics.median(f for _, f in b),
        # The mean gap between B's tokens after the first: the decode steps B rode in.
        "b_itl_median_s": statistics.median((t - f) / max(1, tokens - 1) for t, f in b),
    }


async def _phase(
    url: str, *, flood: int, b_tenant: str | None, b_count: int, tokens: int, interval: float
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=flood + 20, max_keepalive_connections=flood + 20)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        if b_tenant is None:  # B alone on an idle server, one request at a time
            alone = [await _one_streamed(client, "tenant-b", 1000 + i, tokens) for i in range(b_count)]
            return _b_summary(alone, tokens)
        started = time.perf_counter()
        flood_tasks = [asyncio.ensure_future(_one(client, "tenant-a", i, tokens)) for i in range(flood)]
        b_tasks = []
        for i in range(b_count):
            await asyncio.sleep(2.0 if i == 0 else interval)
            b_tasks.append(asyncio.ensure_future(_one_streamed(client, b_tenant, 1000 + i, tokens)))
        b = await asyncio.gather(*b_tasks)
        a_lat = await asyncio.gather(*flood_tasks)
        return {
            **_b_summary(list(b), tokens),
            "a_median_s": statistics.median(a_lat),
            "flood_wall_s": time.perf_counter() - started,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded default model)")
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--b-requests", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--b-interval", type=float, default=2.0, help="seconds between B's requests")
    parser.add_argument("--skip-fifo", action="store_true", help="skip the first-come-first-served comparison")
    parser.add_argument("--rounds", type=int, default=1, help="alone + flood phases per variant, alternating")
    add_variant_option(
        parser,
        "--variant",
        "a server configuration, e.g. 'reserve=--reserved-rows 1' (repeatable; default: the server's defaults)",
    )
    args = parser.parse_args()
    variants = parse_variants(args.variant) or {"default": ""}

    with tempfile.TemporaryDirectory() as store:
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name, flags in variants.items():
                servers[name] = _serve(args, f"{store}/{name}", flag_list(flags))
            kw = {"flood": args.flood, "b_count": args.b_requests, "tokens": args.max_new_tokens}
            kw["interval"] = args.b_interval
            for _, url in servers.values():
                asyncio.run(_phase(url, b_tenant=None, **kw))  # warm-up
            rounds: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {name: [] for name in servers}
            for r in range(args.rounds):
                for name, (_, url) in servers.items():
                    alone = asyncio.run(_phase(url, b_tenant=None, **kw))
                    fair = asyncio.run(_phase(url, b_tenant="tenant-b", **kw))
                    rounds[name].append((alone, fair))
                    ratio = fair["b_median_s"] / alone["b_median_s"]
                    print(
                        f"round {r} {name}: B alone {alone['b_median_s']:.3f} s, in flood {ratio:.2f}x; TTFT "
                        f"{alone['b_ttft_median_s'] * 1e3:.0f} -> {fair['b_ttft_median_s'] * 1e3:.0f} ms, ITL "
                        f"{alone['b_itl_median_s'] * 1e3:.0f} -> {fair['b_itl_median_s'] * 1e3:.0f} ms",
                        flush=True,
                    )
            first_url = next(iter(servers.values()))[1]
            fifo = None if args.skip_fifo else asyncio.run(_phase(first_url, b_tenant="tenant-a", **kw))
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(60)
    print(
        f"model {args.model or 'default'}, {args.flood} requests from A at once, {args.b_requests} from B "
        f"(one every {args.b_interval:g} s), {args.max_new_tokens} new tokens each, batch <= {args.max_batch_size}"
    )
    for (name, flags), results in zip(variants.items(), rounds.values(), strict=True):
        ratios = [fair["b_median_s"] / alone["b_median_s"] for alone, fair in results]
        alone_s = statistics.median(a["b_median_s"] for a, _ in results)
        fair_s = statistics.median(f["b_median_s"] for _, f in results)
        a_s = statistics.median(f["a_median_s"] for _, f in results)
        wall = statistics.median(f["flood_wall_s"] for _, f in results)
        print(f"{name} [{flags or 'defaults'}]")
        print(f"  B alone (idle server):      median {alone_s:.3f} s")
        print(
            f"  B during A's flood (fair):  median {fair_s:.3f} s; per round "
            f"{', '.join(f'{x:.2f}x' for x in ratios)} alone (A's median {a_s:.2f} s, flood {wall:.1f} s)"
        )
    if fifo is None:
        return
    alone_s = statistics.median(a["b_median_s"] for a, _ in next(iter(rounds.values())))
    print(
        f"B behind A's flood (FIFO, {next(iter(variants))}): median {fifo['b_median_s']:.3f} s = "
        f"{fifo['b_median_s'] / alone_s:.2f}x alone (B filed under A's tenant)"
    )


if __name__ == "__main__":
    main()
