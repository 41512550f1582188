"""`python -m bench [s1|s2|s3|s4|s5|all] [--quick] [--url URL]`: the benchmark harness (issue 7).

S1 mixing and S4 many tenants start `prefix-serve serve` (default model, a temporary disk store)
unless --url names a running server, upload the prefixes they need and drive load with httpx.
S2 runs in-process: the engine vs the bare transformers loop on identical work.
S3 replays seeded Poisson traffic against our server and two baselines (bench/s3.py; it starts its own servers).
S5 measures hot streams' inter-token latency while a burst of cold prefixes loads from Redis (bench/cold_burst.py;
it starts redis-server and its own server).
Results go to bench/results/<timestamp>/ (results.json, results.md, PNG plots when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from bench.cold_burst import add_arguments as add_s5_arguments
from bench.harness import Report, log, plot
from bench.s3 import add_arguments as add_s3_arguments


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=["s1", "s2", "s3", "s4", "s5", "all"], nargs="?", default="all")
    p.add_argument("--quick", action="store_true", help="the reduced sizes that finish in minutes on a small CPU")
    p.add_argument("--url", default=None, help="a running server to target instead of starting one")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<timestamp>)")
    p.add_argument("--new-tokens", type=int, default=None, help="S1/S4 tokens per request (quick 32, else 64)")
    p.add_argument("--prefix-len", type=int, default=10)
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats per point (quick 2, else 3)")
    p.add_argument("--tenants", default=None, help="S4 tenant counts, comma-separated (quick 1,100,1000)")
    p.add_argument("--s4-requests", type=int, default=None, help="S4 requests per point (quick 128, else 1024)")
    p.add_argument("--s2-batch", type=int, default=None, help="S2 batch (quick 8, else 32)")
    p.add_argument("--s2-prompt", type=int, default=None, help="S2 prompt tokens (quick 256, else 512)")
    p.add_argument("--s2-new-tokens", type=int, default=None, help="S2 new tokens (quick 128, else 512)")
    p.add_argument(
        "--s2-stock-linear",
        action="store_true",
        help="S2 also runs the engine on torch's default linear kernel (as --stock-linear serves), to split the gain",
    )
    add_s3_arguments(p)
    add_s5_arguments(p, prefix="s5-")
    p.set_defaults(s5_rounds=None)  # quick 1, else 3 (below)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {
        "new_tokens": 32 if q else 64,
        "repeats": 2 if q else 3,
        "s4_requests": 128 if q else 1024,
        "s2_batch": 8 if q else 32,
        "s2_prompt": 256 if q else 512,
        "s2_new_tokens": 128 if q else 512,
        "s5_rounds": 1 if q else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    scenarios = ["s1", "s2", "s3", "s4", "s5"] if args.scenario == "all" else [args.scenario]
    report = Report.create(args.out)
    report.data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    log(f"results in {report.out}")
    from bench.scenarios import run_http, s2_long_context

    if "s2" in scenarios:
        s2_long_context(args, report)
        report.write()
    http = [s for s in scenarios if s in ("s1", "s4")]
    if http:
        run_http(args, report, http)
    if "s3" in scenarios:
        from bench.s3 import s3_traffic

        s3_traffic(args, report)
    if "s5" in scenarios:
        if shutil.which("redis-server") is None:
            log("S5: skipped, no redis-server on PATH (apt-get install -y redis-server)")
        else:
            s5_cold_burst(args, report)
    report.write()


def s5_cold_burst(args: argparse.Namespace, report: Report) -> None:
    """S5 on the server's defaults: ITL of hot streams alone, with a cold burst, with the same burst resident
    (warm), with a burst on the streams' own short prefixes (hot)."""
    from bench.cold_burst import SIZES, measure

    if args.url is not None:
        log("S5: --url is ignored, S5 starts its own Redis and server")
    sizes = argparse.Namespace(**{name: getattr(args, "s5_" + name) for name in SIZES})
    log(f"S5: {sizes.streams} streams, bursts of {sizes.burst}, {sizes.rounds} rounds")
    result = measure(sizes, {"default": ""})["default"]
    report.data["s5_cold_burst"] = {**vars(sizes), **result}
    itl = result["itl_ms"]
    report.table(
        f"S5 cold burst: ITL of {sizes.streams} hot streams (ms), bursts of {sizes.burst}, cold P="
        f"{sizes.cold_prefix_len}",
        ["burst", "ITL p50", "ITL p99", "p99 vs none", "p99 vs none, per round"],
        [
            ["none", itl["none"]["p50"], itl["none"]["p99"], 1.0, ""],
            [
                "cold (Redis)",
                itl["cold"]["p50"],
                itl["cold"]["p99"],
                result["p99_ratio_cold_burst_vs_none"],
                ", ".join(map(str, result["per_round_p99_ratio_cold"])),
            ],
            [
                "warm (same burst, resident)",
                itl["warm"]["p50"],
                itl["warm"]["p99"],
                result["p99_ratio_warm_burst_vs_none"],
                ", ".join(map(str, result["per_round_p99_ratio_warm"])),
            ],
            [
                "hot (control)",
                itl["hot"]["p50"],
                itl["hot"]["p99"],
                result["p99_ratio_hot_burst_vs_none"],
                ", ".join(map(str, result["per_round_p99_ratio_hot"])),
            ],
        ],
    )
    rounds = list(range(1, sizes.rounds + 1))
    plot(
        report.out,
        "s5_cold_burst",
        "S5: ITL p99 with a burst / without, per round",
        "round",
        "ratio",
        {
            "cold burst": (rounds, result["per_round_p99_ratio_cold"]),
            "warm burst": (rounds, result["per_round_p99_ratio_warm"]),
            "hot burst": (rounds, result["per_round_p99_ratio_hot"]),
        },
    )


if __name__ == "__main__":
    main()
