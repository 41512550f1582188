"""One tenant's flood of cold prefixes, and another tenant's requests during it.

Tenant "flood" sends N requests at once, each for a prefix of its own that is stored but not resident (the
server starts fresh on the store, so every one loads). Half a second in, tenant "calm" sends one request for a
prefix already resident ("hot") and one for a cold prefix of its own ("cold"). Reports, per round, calm's hot
request alone on the idle server and both of calm's requests during the flood (latency of a one-token
generation), and the flood's median and slowest request. The target: calm's requests within a few loads' time
of alone, not behind the whole flood.

With --code NAME=PATH (repeatable) the server of each checkout runs (PATH first on PYTHONPATH; "." is this one),
one after the other, rounds alternating, so code versions are compared under the same load:

    python -m bench.cold_flood [--flood 120] [--prefix-len 200] [--rounds 2] [--code old=/tmp/wt_old --code new=.]
        [--server-flags '--prefill-deadline-s 0']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.cold_burst import prefix_blob
from bench.variants import flag_list
from tests.server_process import running_server

TENANT_HEADER = "X-Prefix-Serve-Tenant"


def _generate(client: httpx.AsyncClient, tenant: str, task_id: str):  # type: ignore[no-untyped-def]
    body = {"task_id": task_id, "prompt": "Hi", "max_new_tokens": 1}
    return client.post("/v1/generate", json=body, headers={TENANT_HEADER: tenant})


async def _timed(client: httpx.AsyncClient, tenant: str, task_id: str, delay_s: float = 0.0) -> float:
    await asyncio.sleep(delay_s)
    started = time.perf_counter()
    (await _generate(client, tenant, task_id)).raise_for_status()
    return time.perf_counter() - started


async def one_round(url: str, flood: int) -> dict[str, float]:
    # Two clients: in one, calm's requests waited for a free connection of httpx's pool (100) behind the flood's.
    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        httpx.AsyncClient(base_url=url, timeout=600, limits=unlimited) as flood_client,
        httpx.AsyncClient(base_url=url, timeout=600) as client,
    ):
        await _timed(client, "calm", "hot")  # loads it: resident from now on
        alone = await _timed(client, "calm", "hot")
        flooding = [asyncio.ensure_future(_timed(flood_client, "flood", f"c{i}")) for i in range(flood)]
        hot = asyncio.ensure_future(_timed(client, "calm", "hot", 0.5))
        cold = asyncio.ensure_future(_timed(client, "calm", "cold", 0.5))
        flood_s = await asyncio.gather(*flooding)
        return {
            "calm_hot_alone_s": alone,
            "calm_hot_in_flood_s": await hot,
            "calm_cold_in_flood_s": await cold,
            "flood_median_s": statistics.median(flood_s),
            "flood_max_s": max(flood_s),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=120, help="the flood's requests, each for a cold prefix")
    parser.add_argument("--prefix-len", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--code", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--server-flags", default="", help="extra `prefix-serve serve` flags of the measured servers")
    parser.add_argument("--out", type=Path, help="write the rounds as JSON here")
    args = parser.parse_args()
    codes = dict(spec.partition("=")[::2] for spec in args.code) or {"this": "."}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
    with tempfile.TemporaryDirectory(prefix="cold-flood-") as tmp:
        store = Path(tmp) / "store"
        flags = ["--store", f"disk://{store}", "--max-queue", str(args.flood + 64), "--log-level", "warning"]
        with running_server(flags, Path(tmp) / "upload.log") as server, httpx.Client(base_url=server.url) as c:
            uploads = [("calm", "hot"), ("calm", "cold"), *(("flood", f"c{i}") for i in range(args.flood))]
            for seed, (tenant, task_id) in enumerate(uploads):
                blob = prefix_blob(args.prefix_len, seed)
                c.put(f"/v1/prefixes/{task_id}", content=blob, headers={TENANT_HEADER: tenant}).raise_for_status()
        for round_ in range(args.rounds):
            for name, path in codes.items():
                env = None if path == "." else {"PYTHONPATH": str(Path(path).resolve())}
                measured = [*flags, *flag_list(args.server_flags)]
                with running_server(measured, Path(tmp) / f"{name}.log", env=env) as server:  # fresh: nothing resident
                    result = asyncio.run(one_round(server.url, args.flood))
                results[name].append(result)
                print(f"round {round_ + 1} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
