"""The scenarios of `python -m bench`: S1 mixing, S2 long context, S4 many tenants.

S1 and S4 go through the HTTP server; S2 is in-process (the engine vs the bare transformers loop).
Every ratio compares runs made side by side in the same invocation, alternating where repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from typing import Any

from bench.harness import Report, client, closed_loop, log, median, plot, upload_prefixes


async def s1_mixing(url: str, args: argparse.Namespace, report: Report) -> None:
    levels = [1, 4, 16, 32] if args.quick else [1, 4, 16, 32, 64]
    new_tokens = args.new_tokens
    top = max(levels)
    async with client(url) as c:
        names = [f"s1-t{i}" for i in range(top)]
        log(f"S1: uploading {top} prefixes of {args.prefix_len} tokens")
        await upload_prefixes(c, names, args.prefix_len)
        await closed_loop(c, names[:4], 4, 4)  # warm-up: first use of the model, prefixes on the device
        rows: list[dict[str, Any]] = []
        for n in levels:
            rates: dict[str, list[float]] = {"distinct": [], "shared": []}
            for r in range(args.repeats):
                for mode in ("distinct", "shared"):
                    tasks = names[:n] if mode == "distinct" else [names[0]] * n
                    run = await closed_loop(c, tasks, new_tokens, n)
                    rates[mode].append(run.tokens_per_s)
                    log(f"S1 c={n:>2} {mode:>8} #{r}: {run.tokens} tok in {run.seconds:.2f} s = {run.tokens_per_s:.1f}")
            rows.append({"concurrency": n, **{k: median(v) for k, v in rates.items()}, "runs": rates})
        sequential_n = min(8, top)
        seq = await closed_loop(c, names[:sequential_n], new_tokens, 1)
        log(f"S1 one-at-a-time ({sequential_n} requests): {seq.tokens_per_s:.1f} tok/s")
    for row in rows:
        row["distinct_over_shared"] = row["distinct"] / row["shared"]
        row["distinct_over_one_at_a_time"] = row["distinct"] / seq.tokens_per_s
    report.data["s1_mixing"] = {
        "new_tokens": new_tokens,
        "prefix_len": args.prefix_len,
        "repeats": args.repeats,
        "one_at_a_time_tokens_per_s": seq.tokens_per_s,
        "rows": rows,
    }
    report.table(
        f"S1 mixing ({new_tokens} new tokens, prefix {args.prefix_len}, median of {args.repeats})",
        ["concurrency", "distinct tok/s", "shared tok/s", "distinct/shared", "distinct/one-at-a-time"],
        [
            [r["concurrency"], r["distinct"], r["shared"], r["distinct_over_shared"], r["distinct_over_one_at_a_time"]]
            for r in rows
        ]
        + [["1 (sequential)", seq.tokens_per_s, "", "", 1.0]],
    )
    xs = [r["concurrency"] for r in rows]
    plot(
        report.out,
        "s1_mixing",
        "S1 mixing",
        "concurrency",
        "tokens/s",
        {
            "distinct prefixes": (xs, [r["distinct"] for r in rows]),
            "one shared prefix": (xs, [r["shared"] for r in rows]),
            "one at a time": (xs, [seq.tokens_per_s] * len(xs)),
        },
    )


async def s4_tenants(url: str, args: argparse.Namespace, report: Report) -> None:
    levels = [1, 100, 1000] if args.quick else [1, 100, 1000, 10000]
    if args.tenants:
        levels = [int(x) for x in args.tenants.split(",")]
    concurrency, requests, new_tokens = 32, args.s4_requests, args.new_tokens
    rows: list[dict[str, Any]] = []
    async with client(url) as c:
        log(f"S4: uploading {max(levels)} prefixes of {args.prefix_len} tokens")
        names = [f"s4-t{i}" for i in range(max(levels))]
        await upload_prefixes(c, names, args.prefix_len)
        await closed_loop(c, names[:4], 4, 4)  # warm-up
        rng = random.Random(0)
        for n in levels:
            # Round-robin over a shuffled set of n tenants: with n >= requests every request has its own prefix.
            pool = names[:n]
            rng.shuffle(pool)
            tasks = [pool[i % n] for i in range(requests)]
            run = await closed_loop(c, tasks, new_tokens, concurrency)
            distinct = len(set(tasks))
            log(f"S4 n={n} ({distinct} used): {run.tokens} tok, {run.seconds:.2f} s = {run.tokens_per_s:.1f}/s")
            rows.append({"tenants": n, "distinct_used": distinct, "tokens_per_s": run.tokens_per_s})
        from bench.memory import memory_point

        await memory_point(url, c, names, args, report)  # peak RSS with all prefixes registered, 64 at once
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_vs_first"] = row["tokens_per_s"] / base
    report.data["s4_tenants"] = {
        "concurrency": concurrency,
        "requests": requests,
        "new_tokens": new_tokens,
        "prefix_len": args.prefix_len,
        "rows": rows,
    }
    report.table(
        f"S4 many tenants (concurrency {concurrency}, {requests} requests, {new_tokens} new tokens)",
        ["tenants registered", "distinct prefixes used", "tok/s", f"ratio vs {levels[0]}"],
        [[r["tenants"], r["distinct_used"], r["tokens_per_s"], r["ratio_vs_first"]] for r in rows],
    )
    plot(
        report.out,
        "s4_tenants",
        "S4 many tenants",
        "tenants",
        "tokens/s",
        {"throughput": ([r["tenants"] for r in rows], [r["tokens_per_s"] for r in rows])},
    )


def s2_long_context(args: argparse.Namespace, report: Report) -> None:
    """The engine vs the bare transformers loop on identical work, in-process, on the default model."""
    from bench.inproc import Timing, bare_loop, engine_requests, engine_run, make_engine, random_prompts
    from server.cpu_linear import stock_linear
    from server.fused_projections import unfused
    from server.model_loading import load_model

    model = load_model(None)
    vocab = int(model.model.config.get_text_config().vocab_size)
    batch, prompt_len, new_tokens = args.s2_batch, args.s2_prompt, args.s2_new_tokens
    prompts = random_prompts(batch, prompt_len, vocab)
    rates: dict[str, list[float]] = {"engine": [], "bare": []}
    if args.s2_stock_linear:
        rates["engine_stock_linear"] = []

    def run_engine(tokens: int, onednn_linear: bool = True) -> Timing:
        # A fresh engine per run, shut down after it: its thread's OpenMP pool goes with it, and starting it
        # frees this thread's, so each side runs with the process's only pool (see server/threads.py).
        engine = make_engine(
            model.model,
            model.num_layers,
            model.num_kv_heads,
            model.head_dim,
            model.max_context,
            max(batch, 1),
            onednn_linear=onednn_linear,
        )
        engine.start()
        try:
            return engine_run(engine, engine_requests(prompts, tokens))
        finally:
            engine.shutdown()

    log(f"S2: warm-up (batch {batch}, prompt {prompt_len})")
    run_engine(2)
    bare_loop(model.model, prompts, 2)
    for r in range(args.repeats):
        e = run_engine(new_tokens)
        rates["engine"].append(e.tokens_per_s)
        log(f"S2 engine #{r}: {e.tokens} tok in {e.seconds:.2f} s = {e.tokens_per_s:.1f}")
        b = bare_loop(model.model, prompts, new_tokens)
        rates["bare"].append(b.tokens_per_s)
        log(f"S2 bare #{r}: {b.tokens} tok, {b.seconds:.2f} s = {b.tokens_per_s:.1f} (prefill {b.prefill_s:.2f})")
        if args.s2_stock_linear:
            # The engine's own changes alone, on the bare loop's layers and matmul kernel.
            with unfused(model.model), stock_linear(model.model):
                s = run_engine(new_tokens, onednn_linear=False)
            rates["engine_stock_linear"].append(s.tokens_per_s)
            log(f"S2 engine, stock linear #{r}: {s.tokens} tok in {s.seconds:.2f} s = {s.tokens_per_s:.1f}")
    eng, bare = median(rates["engine"]), median(rates["bare"])
    report.data["s2_long_context"] = {
        "batch": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "tokens_per_s": rates,
        "engine_over_bare": eng / bare,
    }
    columns = ["engine tok/s", "bare transformers loop tok/s", "engine/bare"]
    row = [eng, bare, eng / bare]
    if args.s2_stock_linear:
        stock = median(rates["engine_stock_linear"])
        report.data["s2_long_context"]["engine_stock_linear_over_bare"] = stock / bare
        columns += ["engine on stock linear tok/s", "its /bare"]
        row += [stock, stock / bare]
    report.table(
        f"S2 long context (batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, median of {args.repeats})",
        columns,
        [row],
    )


def run_http(args: argparse.Namespace, report: Report, scenarios: list[str]) -> None:
    from bench.harness import server_url

    top = 64 if not args.quick else 32
    serve_args = [
        "--max-batch-size",
        str(top),
        "--max-queue",
        "4096",
        "--host-cache-bytes",
        str(8 * 2**30),
        "--max-new-tokens",
        "4096",
    ]
    with server_url(args.url, report.out, serve_args) as url:
        if "s1" in scenarios:
            asyncio.run(s1_mixing(url, args, report))
            report.write()
        if "s4" in scenarios:
            asyncio.run(s4_tenants(url, args, report))
            report.write()
