"""`python -m bench s3`: real traffic (issue 7) against our server and two baselines, by one harness.

For each rate λ the same seeded workload (bench/traffic.py) is replayed in real time against:

* ours: `prefix-serve serve --max-batch-size 32` (continuous batching), streamed over HTTP;
* one-at-a-time: the same server binary with `--max-batch-size 1`, streamed over HTTP;
* static batching per task: in this process, server/runner.py's ModelRunner on the same model, prompts, prefixes
  and greedy lengths. Requests queue per tenant (bench.traffic.StaticBatcher); the ready batch is prefilled and
  decoded until every row has its tokens (rows leave when done, nobody joins), one batch at a time.

Arrivals are generated over the whole run (``cap_s``) so the load never stops early, but only requests that
arrive within the first ``window_s`` are measured; a run ends when all measured requests have finished or at
``cap_s``, whichever is first, and measured requests unfinished then count as missed. Token times: when the
client receives a streamed token (HTTP), or when the step that sampled it returns (static, in-process: no HTTP
costs, a slight advantage to that baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from bench.harness import (
    Report,
    client,
    closed_loop,
    log,
    plot,
    prefix_blob,
    scrape,
    server_url,
    upload_prefixes,
)
from bench.traffic import Outcome, Slo, StaticBatcher, TrafficRequest, make_workload, summarize
from bench.variants import add_variant_option, flag_list, parse_variants
from server.gc_freeze import frozen_heap

TENANTS = 100
# Common words; those the tokenizer keeps as one token after a space make prompts of exact token counts.
WORDS = (  # split in Prompts
    "the of and to in is was for on that with as by at from his her an which are this be or had not but have "
    "one they you were all their we there been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three city river bridge house water light night story road music"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default=None, help="S3 arrival rates in requests/s, comma-separated")
    p.add_argument("--s3-window", type=float, default=None, help="S3 measurement window in s (quick 20, else 40)")
    p.add_argument("--s3-cap", type=float, default=None, help="S3 longest run in s (quick 50, else 90)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="S3 SLO: time to first token, s")
    p.add_argument("--slo-itl", type=float, default=0.3, help="S3 SLO: a request's mean inter-token latency, s")
    p.add_argument("--static-batch", type=int, default=8, help="S3 static baseline: batch size per task")
    p.add_argument("--static-wait", type=float, default=1.0, help="S3 static baseline: longest wait for a batch, s")
    p.add_argument("--seed", type=int, default=0, help="S3 workload seed")
    add_variant_option(
        p, "--s3-variant", "S3: also replay each rate against our server started with these extra flags (repeatable)"
    )
    p.add_argument("--s3-no-baselines", action="store_true", help="S3: skip one-at-a-time and static batching")


class Prompts:
    """Prompt text and token ids of exactly n tokens (as the server tokenises `prompt`), per request index."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.words = [w for w in WORDS.split() if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]
        self.special = len(tokenizer("").input_ids)  # tokens the tokenizer adds (BOS), counted in the length
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, r: TrafficRequest) -> tuple[str, list[int]]:
        if r.index not in self._cache:
            rng = random.Random(f"prompt-{r.index}")
            n = max(1, r.prompt_tokens - self.special)
            text = "".join(" " + rng.choice(self.words) for _ in range(n))
            ids = list(self.tokenizer(text).input_ids)  # the server's own call (server/api/generate.py)
            self._cache[r.index] = (text, ids)
        return self._cache[r.index]


def task_name(tenant: int) -> str:
    return f"s3-t{tenant}"


# ----- our server over HTTP ---------------------------------------------------------------------------------


async def drive_http(
    url: str, requests: Sequence[TrafficRequest], prompts: Prompts, measured: int, cap_s: float
) -> tuple[list[Outcome], dict[str, int]]:
    """Replay ``requests`` in real time as streamed /v1/generate calls; outcomes of the first ``measured``."""
    outcomes = [Outcome(r) for r in requests]
    errors: dict[str, int] = {}
    async with client(url) as c:
        start = time.perf_counter()

        async def one(o: Outcome) -> None:
            r = o.request
            await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - start)))
            body = {
                "task_id": task_name(r.tenant),
                "prompt": prompts.get(r)[0],
                "max_new_tokens": r.output_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            async with c.stream("POST", "/v1/generate", json=body) as resp:
                if resp.status_code != 200:
                    errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = time.perf_counter() - start
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors["stream"] = errors.get("stream", 0) + 1
                        return
                    if event.get("token_id") is not None:
                        o.token_times.append(now)
                    if event.get("finish_reason"):
                        o.finished = True
                        o.prompt_tokens = event["usage"]["prompt_tokens"]
                        return

        tasks = [asyncio.create_task(one(o)) for o in outcomes]
        if measured:
            await asyncio.wait(tasks[:measured], timeout=max(0.0, cap_s - (time.perf_counter() - start)))
        for t in tasks:
            t.cancel()  # closing the stream cancels the request on the server
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for res in results:
        if isinstance(res, Exception) and not isinstance(res, asyncio.CancelledError):
            errors[type(res).__name__] = errors.get(type(res).__name__, 0) + 1
    return outcomes[:measured], errors


def wait_idle(url: str, timeout_s: float = 60) -> None:
    """Until the server has no waiting or running request (cancelled streams free their rows a step later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = scrape(url)
        if m.get("prefix_serve_queue_depth", 0) == 0 and m.get("prefix_serve_running_requests", 0) == 0:
            return
        time.sleep(0.5)
    log(f"warning: {url} still busy after {timeout_s} s")


def padding_share(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean padded share of the batch's KV slots over the forward passes between two scrapes."""
    name = "prefix_serve_batch_padding_ratio"
    count = after.get(name + "_count", 0) - before.get(name + "_count", 0)
    return (after.get(name + "_sum", 0) - before.get(name + "_sum", 0)) / count if count else math.nan


# ----- static batching per task, in-process -----------------------------------------------------------------


def run_static(
    runner: Any,
    requests: Sequence[TrafficRequest],
    prompts: Prompts,
    prefixes: Sequence[Any],
    measured: int,
    cap_s: float,
    batch_size: int,
    max_wait_s: float,
) -> list[Outcome]:
    """Replay ``requests`` in real time through ``StaticBatcher`` and the runner; outcomes of the first ``measured``."""
    from server.batch import NewRequest
    from server.sampling import SamplingParams

    outcomes = [Outcome(r) for r in requests]
    pending = list(requests)  # in arrival order
    batcher = StaticBatcher(batch_size, max_wait_s)
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    while clock() < cap_s and not all(o.finished for o in outcomes[:measured]):
        now = clock()
        while pending and pending[0].arrival_s <= now:
            batcher.add(pending.pop(0))
        group = batcher.next_batch(now)
        if group is None:
            wake = min(pending[0].arrival_s if pending else cap_s, batcher.next_deadline() or cap_s, cap_s)
            time.sleep(max(0.0, wake - now))
            continue
        new = [
            NewRequest(
                str(r.index),
                prompts.get(r)[1],
                SamplingParams(max_new_tokens=r.output_tokens, ignore_eos=True),
                prefixes[r.tenant],
                task_name(r.tenant),
            )
            for r in group
        ]
        batch, _ = runner.prefill(new)
        while batch is not None:
            now = clock()
            keep = []
            for request_id in batch.request_ids:
                o = outcomes[int(request_id)]
                o.token_times.append(now)
                if len(o.token_times) >= o.request.output_tokens:
                    o.finished = True
                else:
                    keep.append(request_id)
            batch = batch.filter(keep)
            if batch is None or clock() >= cap_s:
                break
            runner.decode(batch)
    return outcomes[:measured]


# ----- the scenario -----------------------------------------------------------------------------------------


def s3_traffic(args: argparse.Namespace, report: Report) -> None:
    from prefix_store.artifact import parse_uploaded_native
    from server.model_loading import load_model, load_tokenizer
    from server.runner import ModelRunner

    quick = args.quick
    default_rates = [0.5, 1.0] if quick else [0.25, 0.5, 0.625, 0.75, 1.0]
    rates = [float(x) for x in args.rates.split(",")] if args.rates else default_rates
    window = args.s3_window or (20.0 if quick else 40.0)
    cap = args.s3_cap or (50.0 if quick else 90.0)
    slo = Slo(args.slo_ttft, args.slo_itl)
    baselines = not args.s3_no_baselines
    runner = None
    if baselines:
        log("S3: loading the default model in-process for the static baseline and the prompts' token counts")
        model = load_model(None)
        tokenizer = model.tokenizer
        runner = ModelRunner(model.model, model.num_layers, model.num_kv_heads, model.head_dim)
    else:  # no in-process baseline: the tokenizer alone counts the prompts' tokens
        tokenizer = load_tokenizer(None)
    prompts = Prompts(tokenizer)
    log(f"S3: {len(prompts.words)} one-token words; the tokenizer adds {prompts.special} token(s)")
    prefixes = [parse_uploaded_native(prefix_blob(args.prefix_len, i)) for i in range(TENANTS)]
    names = [task_name(i) for i in range(TENANTS)]
    common = ["--max-queue", "4096", "--max-new-tokens", "4096"]
    systems = {"ours": ["--max-batch-size", "32", *common]}
    for name, flags in parse_variants(args.s3_variant).items():  # side by side with "ours", under the same load
        systems[f"ours-{name}"] = [*systems["ours"], *flag_list(flags)]
    if baselines:
        systems["one_at_a_time"] = ["--max-batch-size", "1", *common]
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        urls = {}
        for name, serve_args in systems.items():
            work = report.out / f"s3-{name}"
            work.mkdir(exist_ok=True)
            urls[name] = stack.enter_context(server_url(None, work, serve_args))

            async def prepare(url: str) -> None:
                async with client(url) as c:
                    await upload_prefixes(c, names, args.prefix_len)
                    await closed_loop(c, names[:2], 4, 2)  # warm-up

            asyncio.run(prepare(urls[name]))
        warm = make_workload(1.0, 10.0, args.seed)[:2]
        if runner is not None:
            run_static(runner, warm, prompts, prefixes, len(warm), 30.0, 2, 0.0)  # warm-up
        for rate in rates:
            workload = make_workload(rate, cap, args.seed)
            measured = sum(r.arrival_s < window for r in workload)
            for name in [*systems, *(["static"] if baselines else [])]:
                errors: dict[str, int] = {}
                if name == "static":
                    assert runner is not None  # "static" runs only with the baselines, which load the model
                    t0 = time.perf_counter()
                    outcomes = run_static(
                        runner, workload, prompts, prefixes, measured, cap, args.static_batch, args.static_wait
                    )
                    wall, pad = time.perf_counter() - t0, math.nan
                else:
                    url = urls[name]
                    before = scrape(url)
                    with frozen_heap():  # this client's own full collections stay out of the latencies it times
                        t0 = time.perf_counter()
                        outcomes, errors = asyncio.run(drive_http(url, workload, prompts, measured, cap))
                        wall = time.perf_counter() - t0
                    pad = padding_share(before, scrape(url))
                    wait_idle(url)
                stats = summarize(outcomes, window, slo)
                row = {"rate": rate, "system": name, **stats, "wall_s": wall, "padding_share": pad, "errors": errors}
                rows.append(row)
                log(
                    f"S3 λ={rate} {name:>13}: {stats['good']}/{stats['requests']} good, {stats['finished']} done, "
                    f"goodput {stats['goodput_rps']:.3f}/s, TTFT p50/p99 {stats['ttft_p50_s']:.2f}/"
                    f"{stats['ttft_p99_s']:.2f} s, ITL p50/p99 {stats['itl_p50_s'] * 1e3:.0f}/"
                    f"{stats['itl_p99_s'] * 1e3:.0f} ms, padding {pad:.2f}, {wall:.0f} s {errors or ''}"
                )
                report.data["s3_traffic"] = {"rows": rows}
                report.write()
    finish_report(report, rows, rates, window, cap, slo, args)


def finish_report(
    report: Report,
    rows: list[dict[str, Any]],
    rates: list[float],
    window: float,
    cap: float,
    slo: Slo,
    args: argparse.Namespace,
) -> None:
    by = {(r["rate"], r["system"]): r for r in rows}
    ratios = []
    for rate in [] if args.s3_no_baselines else rates:
        ours = by[(rate, "ours")]["goodput_rps"]
        ratios.append(
            {
                "rate": rate,
                "ours_p99_meets_slo": by[(rate, "ours")]["p99_meets_slo"],
                "over_static": _ratio(ours, by[(rate, "static")]["goodput_rps"]),
                "over_one_at_a_time": _ratio(ours, by[(rate, "one_at_a_time")]["goodput_rps"]),
            }
        )
    meeting = [r["rate"] for r in ratios if r["ours_p99_meets_slo"]]
    report.data["s3_traffic"] = {
        "window_s": window,
        "cap_s": cap,
        "slo": {"ttft_s": slo.ttft_s, "mean_itl_s": slo.itl_s},
        "static_batch": args.static_batch,
        "static_wait_s": args.static_wait,
        "seed": args.seed,
        "prefix_len": args.prefix_len,
        "rows": rows,
        "ratios": ratios,
        "highest_rate_meeting_slo": max(meeting) if meeting else None,
    }
    report.table(
        f"S3 real traffic ({window:.0f} s measured, runs ≤ {cap:.0f} s; SLO TTFT ≤ {slo.ttft_s} s, "
        f"mean ITL ≤ {slo.itl_s * 1e3:.0f} ms)",
        ["λ req/s", "system", "measured", "done", "good", "req/s", "tok/s", "TTFT p50 s", "TTFT p99 s",
         "ITL p50 ms", "ITL p99 ms", "goodput req/s", "p99s meet SLO", "padded KV share"],
        [
            [r["rate"], r["system"], r["requests"], r["finished"], r["good"], r["throughput_rps"], r["tokens_per_s"],
             r["ttft_p50_s"], r["ttft_p99_s"], r["itl_p50_s"] * 1e3, r["itl_p99_s"] * 1e3, r["goodput_rps"],
             "yes" if r["p99_meets_slo"] else "no", "" if math.isnan(r["padding_share"]) else r["padding_share"]]
            for r in rows
        ],
    )  # fmt: skip
    systems = sorted({r["system"] for r in rows})
    plot(
        report.out,
        "s3_goodput",
        "S3 goodput",
        "arrival rate (req/s)",
        "goodput (req/s within SLO)",
        {s: (rates, [by[(x, s)]["goodput_rps"] for x in rates]) for s in systems},
    )
    if not ratios:
        return
    report.table(
        "S3 goodput ratios (ours over each baseline)",
        ["λ req/s", "ours' p99s meet SLO", "ours/static per task", "ours/one-at-a-time"],
        [[r["rate"], "yes" if r["ours_p99_meets_slo"] else "no", r["over_static"], r["over_one_at_a_time"]]
         for r in ratios],
    )  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b else (math.inf if a else math.nan)
