"""Issue 7's memory figure: peak server RSS with many prefixes registered and a full batch, against its parts.

The parts: the weights (parameter bytes of the default model, fp32), the batch's KV (rows x length x layers x 2 x
H_kv x d x 4 bytes, length = P + prompt + new tokens, the padded layout's minimum) and the resident prefixes (the
server's own `prefix_serve_prefix_cache_bytes`, host and device tiers). Peak RSS is VmHWM from /proc: the most the
process held at any time since it started, uploads included.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import httpx

from bench.harness import DIM, HEADS, LAYERS, PROMPT, Report, closed_loop, log, scrape, server_memory

MIB = 2**20


def weight_bytes() -> tuple[int, int]:
    """The default model's weights as a CPU server holds them (fp32; the harness starts it without
    --stock-linear): bytes of dense parameters, and of linear weights packed for oneDNN (server/cpu_linear.py).
    Switched as the server's runner switches it: a packed weight is the only copy unless another parameter
    shares the dense one (the tied lm_head)."""
    from server.cpu_linear import switched_layers, use_onednn_linear
    from server.model_loading import load_model

    model = load_model(None).model
    use_onednn_linear(model, free_dense=True)
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    packed = sum(layer.weight.numel() * layer.weight.element_size() for layer in switched_layers(model))
    return dense, packed


def kv_bytes(rows: int, length: int) -> int:
    return rows * length * LAYERS * 2 * HEADS * DIM * 4


async def memory_point(
    url: str, c: httpx.AsyncClient, names: Sequence[str], args: argparse.Namespace, report: Report
) -> None:
    """Run ``concurrency`` requests at once, each with its own prefix, then read the server's memory."""
    try:
        await _memory_point(url, c, names, args, report)
    except Exception as exc:  # a failed extra figure must not lose the scenario's own results
        log(f"memory: failed: {exc!r}")


async def _memory_point(
    url: str, c: httpx.AsyncClient, names: Sequence[str], args: argparse.Namespace, report: Report
) -> None:
    concurrency = 64
    if server_memory(url) is None:
        log("memory: skipped (the server was not started by this harness, so its /proc entry is unknown)")
        return
    r = await c.post("/v1/generate", json={"task_id": names[0], "prompt": PROMPT, "max_new_tokens": 1})
    prompt_tokens = int(r.json()["usage"]["prompt_tokens"])
    # Two rounds of distinct prefixes, so the batch stays full of different tenants.
    tasks = list(names[-2 * concurrency :])
    run = await closed_loop(c, tasks, args.new_tokens, concurrency)
    log(f"memory: {len(tasks)} requests at concurrency {concurrency}: {run.tokens_per_s:.1f} tok/s")
    mem = server_memory(url)
    assert mem is not None
    metrics = scrape(url)
    resident = sum(v for k, v in metrics.items() if k.startswith("prefix_serve_prefix_cache_bytes{"))
    weights, packed = weight_bytes()
    length = args.prefix_len + prompt_tokens + args.new_tokens
    kv = kv_bytes(concurrency, length)
    parts = weights + packed + kv + resident
    data: dict[str, Any] = {
        "prefixes_registered": len(names),
        "concurrency": concurrency,
        "kv_length": length,
        "weights_bytes": weights,
        "packed_linear_bytes": packed,
        "kv_bytes": kv,
        "resident_prefix_bytes": resident,
        "parts_bytes": parts,
        **mem,
        "peak_over_parts": mem["peak_rss_bytes"] / parts,
    }
    report.data["memory"] = data
    report.table(
        f"Memory ({len(names)} prefixes registered, concurrency {concurrency}, KV length {length})",
        ["weights MiB", "packed linear MiB", "KV MiB", "resident prefixes MiB", "sum MiB", "peak RSS MiB",
         "RSS now MiB", "peak/sum"],
        [[weights / MIB, packed / MIB, kv / MIB, resident / MIB, parts / MIB, mem["peak_rss_bytes"] / MIB,
          mem["rss_bytes"] / MIB, data["peak_over_parts"]]],
    )  # fmt: skip
