"""GPU benchmark: a random-initialised Llama-3.2-1B-shaped model, the engine vs the bare transformers loop.

No download and no network: the model is built from a ``LlamaConfig`` with random weights (bf16 on CUDA).
First, on the device, two checks: on a tiny config in float32, the default runner's fixed-shape decode steps
(CUDA graphs, fused projections, the decode-attention kernel), plain and compiled, give the stock layers' eager
greedy tokens; and the decode-attention kernel against SDPA under the same mask, with its time inside a CUDA
graph. Then, for each batch size, it prints:

* engine tokens/s with all-distinct prefixes ("mixed") and with one shared prefix ("single"), and their ratio;
* engine tokens/s without prefixes vs the bare transformers loop (``DynamicCache``, left padding, mask) on
  identical work, and their ratio, for engines of ``ENGINES`` side by side. By default (``DEFAULT_ENGINES``): the
  default engine (graph-replayed decode steps, each launched before the last one's tokens are handed out),
  the same with the step compiled first (``--compile-decode``), and the server's fused defaults (prompt chunks,
  KV groups). ``--engines`` adds others: on the stock layers, with SDPA decode attention, steps in turn, the
  eager transformers step;
* the decode step time (engines and bare loop, prefill excluded) against the memory-bandwidth floor:
  (bytes of weights + bytes of KV read per step) / measured device copy bandwidth; and the runner's step alone
  in steady state at the engine runs' mean context (no joins, growth or captures; ``--runner-steps``).

With --profile DIR, torch.profiler tables of a few steps per batch size (engines and the bare loop).

    bench/gpu.sh                      # H100: batch 64 and 128, bf16 (about 5 minutes)
    bench/gpu.sh --device cpu --tiny  # a CPU smoke run on a tiny config
    bench/gpu.sh --engines engine,engine_stock,compiled,compiled_stock   # what fusing q/k/v and gate/up gains
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.inproc import (
    Timing,
    bare_loop,
    engine_requests,
    engine_run,
    engine_tokens,
    make_engine,
    random_prompts,
    synchronize,
)
from server.config import ServeConfig
from server.engine import Engine
from server.fused_projections import is_fused

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
# What `prefix-serve serve` runs with: prompt chunks fused into decode steps, running rows in padded groups.
FUSED_SCHEDULER = {
    "prefill_chunk_tokens": ServeConfig.prefill_chunk_tokens,
    "kv_groups": ServeConfig.kv_groups,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 1024,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


@dataclass
class Models:
    """Two copies of the same random weights: one the runners fuse (q/k/v and gate/up in one matmul each,
    server/fused_projections.py, the default on CUDA), one left as transformers builds it (the bare loop's, and
    the engines that show what fusing gains)."""

    fused: LlamaForCausalLM
    stock: LlamaForCausalLM

    @property
    def shape(self) -> tuple[int, int, int]:
        cfg = self.stock.config
        return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    @property
    def context(self) -> int:
        return self.stock.config.max_position_embeddings


# Runner options for each copy. oneDNN linear layers off: they matter on a CPU only, and they would free the
# dense weights that fusing stacks (a CPU smoke run then fuses as a GPU run does).
FUSED: dict[str, Any] = {"fuse_projections": True, "onednn_linear": False}
STOCK: dict[str, Any] = {"fuse_projections": False, "onednn_linear": False}

# The engines a batch size is timed with, by name (--engines picks some). MAIN also runs mixed/single prefixes.
MAIN = "engine"
ENGINES: dict[str, Callable[[Models, int], Engine]] = {
    # The default runner: fixed-shape decode steps (replayed from CUDA graphs on a GPU), fused projections.
    "engine": lambda m, b: make_engine(m.fused, *m.shape, m.context, b, **FUSED),
    # The same on the stock layers (the default before fused projections).
    "engine_stock": lambda m, b: make_engine(m.stock, *m.shape, m.context, b, **STOCK),
    # The default with each step's tokens handed out before the next step is launched (no overlap).
    "in_turn": lambda m, b: make_engine(m.fused, *m.shape, m.context, b, overlap_steps=False, **FUSED),
    # The default with SDPA over every KV column instead of server/decode_attention.py's kernel.
    "engine_sdpa": lambda m, b: make_engine(m.fused, *m.shape, m.context, b, decode_kernel=False, **FUSED),
    # The default, the step compiled first (Inductor's fused kernels, then replayed from graphs).
    "compiled": lambda m, b: make_engine(m.fused, *m.shape, m.context, b, compile_decode=True, **FUSED),
    # The same with KV buffers that grow by half when full, instead of reserving the rows' decode steps.
    "compiled_growing": lambda m, b: make_engine(
        m.fused, *m.shape, m.context, b, compile_decode=True, reserve_decode=False, **FUSED
    ),
    "compiled_sdpa": lambda m, b: make_engine(
        m.fused, *m.shape, m.context, b, compile_decode=True, decode_kernel=False, **FUSED
    ),
    "compiled_stock": lambda m, b: make_engine(m.stock, *m.shape, m.context, b, compile_decode=True, **STOCK),
    # The eager transformers decode step on the stock layers (the engine before graphs).
    "eager": lambda m, b: make_engine(m.stock, *m.shape, m.context, b, static_decode=False, **STOCK),
    # The server's defaults: prompts enter in chunks fused into decode steps, rows in padded groups.
    "fused": lambda m, b: make_engine(m.fused, *m.shape, m.context, b, **FUSED_SCHEDULER, **FUSED),
}
DEFAULT_ENGINES = "engine,compiled,fused"
# The runner's step alone, in steady state: (model copy, static_decode, compile_decode, decode_kernel) by name.
RUNNER_STEPS: dict[str, tuple[str, bool | None, bool, bool]] = {
    "graphs": ("fused", None, False, True),
    "graphs_sdpa": ("fused", None, False, False),
    "graphs_stock": ("stock", None, False, False),
    "compiled": ("fused", None, True, True),
    "compiled_sdpa": ("fused", None, True, False),
    "compiled_stock": ("stock", None, True, False),
    "eager": ("stock", False, False, False),
}
DEFAULT_RUNNER_STEPS = "graphs,compiled"


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**(TINY if tiny else LLAMA_1B))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise straight on the device: no 5 GB fp32 detour through the host
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 20) -> float:
    """Bytes/s moved by a device-to-device copy (each copy reads and writes ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    synchronize(device)
    return 2 * nbytes * iters / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny config (smoke test, e.g. on CPU)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--batches", default=None, help="comma-separated (default 64,128; tiny 4,8)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 (tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny 16)")
    p.add_argument("--prefix-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the results JSON here (after each batch)")
    p.add_argument("--profile", type=Path, default=None, help="a folder for torch.profiler tables of a few steps")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument(
        "--runner-steps", default=DEFAULT_RUNNER_STEPS, help=f"comma-separated, of {', '.join(RUNNER_STEPS)}"
    )
    args = p.parse_args(argv)
    args.engines = _names(args.engines, ENGINES, p, "--engines", required=MAIN)
    args.runner_steps = _names(args.runner_steps, RUNNER_STEPS, p, "--runner-steps")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = [int(b) for b in (args.batches or ("4,8" if args.tiny else "64,128")).split(",")]
    prompt_len = args.prompt_len or (16 if args.tiny else 128)
    new_tokens = args.new_tokens or (16 if args.tiny else 256)
    short_tokens = max(2, new_tokens // 4)

    check = check_static_decode(device)
    print(f"check: {check}", flush=True)
    kernel_check = check_decode_kernel(device, dtype)
    print(f"decode attention kernel: {kernel_check}", flush=True)
    models = Models(build_model(args.tiny, device, dtype), build_model(args.tiny, device, dtype))
    layers, kv_heads, head_dim = models.shape
    elem = torch.tensor([], dtype=dtype).element_size()
    # Tied embedding counted once (parameters() yields a shared tensor once).
    weight_bytes = sum(t.numel() * t.element_size() for t in models.stock.parameters())
    bandwidth = copy_bandwidth(device, 256 * 2**20 if device.type == "cuda" else 64 * 2**20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {dtype}, torch {torch.__version__}", flush=True)
    print(f"weights {weight_bytes / 2**20:.1f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)

    results: dict[str, Any] = {
        "device": name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "config": TINY if args.tiny else LLAMA_1B,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefix_len": args.prefix_len,
        "engines": args.engines,
        "static_decode_check": check,
        "decode_kernel_check": kernel_check,
        "batches": {},
    }
    g = torch.Generator().manual_seed(1)
    for batch in batches:
        prompts = random_prompts(batch, prompt_len, models.stock.config.vocab_size)
        prefixes = [
            (torch.randn(layers, 2, kv_heads, args.prefix_len, head_dim, generator=g) * 0.5).to(dtype)
            for _ in range(batch)
        ]
        runs, graphs, agree = measure_batch(models, batch, prompts, prefixes, new_tokens, short_tokens, args)
        # The runner's step alone, in steady state (no joins, no growth, no capture): what the replay costs. Its
        # prompts are as long as the engine runs' mean context (prompt + half the new tokens), so that the two
        # steps read as much KV and their difference is the engine's (growth, captures, host work).
        mean_prompts = random_prompts(batch, prompt_len + new_tokens // 2, models.stock.config.vocab_size, seed=2)
        runner_step = {
            key: runner_step_s(
                getattr(models, copy), mean_prompts, static, compiled, fuse=copy == "fused", kernel=kernel
            )
            for key, (copy, static, compiled, kernel) in RUNNER_STEPS.items()
            if key in args.runner_steps
        }
        fastest = {key: min(timings, key=lambda t: t.seconds) for key, timings in runs.items()}
        b = fastest["bare"]
        bare_step = (b.seconds - (b.prefill_s or 0.0)) / (new_tokens - 1)
        mean_context = prompt_len + new_tokens / 2
        kv_bytes = layers * 2 * kv_heads * head_dim * mean_context * batch * elem
        floor = (weight_bytes + kv_bytes) / bandwidth
        row: dict[str, Any] = {
            "mixed_tokens_per_s": fastest["mixed"].tokens_per_s,
            "single_tokens_per_s": fastest["single"].tokens_per_s,
            "mixed_over_single": fastest["mixed"].tokens_per_s / fastest["single"].tokens_per_s,
            "bare_tokens_per_s": b.tokens_per_s,
            "bare_step_s": bare_step,
            "floor_step_s": floor,
            "kv_bytes_per_step_at_mean_context": kv_bytes,
            "bare_step_over_floor": bare_step / floor,
            "engines": {},
            "graphs": graphs,
            "runner_step_s": runner_step,
            "runner_step_over_floor": {key: value / floor for key, value in runner_step.items()},
            "rows_agreeing_default_vs_stock_eager_32_tokens": f"{sum(agree)}/{len(agree)}",
            "runs_s": {key: [round(t.seconds, 4) for t in timings] for key, timings in runs.items()},
        }
        lines = [
            f"batch {batch}: mixed {row['mixed_tokens_per_s']:.0f} tok/s, single {row['single_tokens_per_s']:.0f}, "
            f"mixed/single {row['mixed_over_single']:.3f}; bare loop {b.tokens_per_s:.0f} tok/s, step "
            f"{bare_step * 1e3:.2f} ms ({bare_step / floor:.2f}x floor); floor {floor * 1e3:.3f} ms"
        ]
        for key in args.engines:
            # Decode step time without prefill, from the difference of two run lengths.
            step = (fastest[key].seconds - fastest[f"{key}_short"].seconds) / (new_tokens - short_tokens)
            row["engines"][key] = entry = {
                "tokens_per_s": fastest[key].tokens_per_s,
                "over_bare": fastest[key].tokens_per_s / b.tokens_per_s,
                "step_s": step,
                "step_over_floor": step / floor,
            }
            lines.append(
                f"  {key:16} {entry['tokens_per_s']:8.0f} tok/s = {entry['over_bare']:5.2f}x bare; "
                f"step {step * 1e3:6.3f} ms = {entry['step_over_floor']:5.2f}x floor"
            )
        for key, value in runner_step.items():
            lines.append(f"  runner step {key:16} {value * 1e3:6.3f} ms = {value / floor:5.2f}x floor")
        lines.append(f"  graphs {graphs}; rows agreeing {row['rows_agreeing_default_vs_stock_eager_32_tokens']}")
        lines.append(f"  runs {row['runs_s']}")
        print("\n".join(lines), flush=True)
        results["batches"][str(batch)] = row
        if args.out is not None:  # after every batch, so a run cut short still leaves what it measured
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _names(
    text: str, known: dict[str, Any], parser: argparse.ArgumentParser, flag: str, required: str | None = None
) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if required is not None and required not in names:
        parser.error(f"{flag} must include {required} (mixed and single prefixes run on it)")
    return names


def check_decode_kernel(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """server/decode_attention.py's kernel on this device: its largest difference from SDPA under the same mask
    (fresh random inputs, left padding, NaN in the columns it must not read), and its time against SDPA over all
    C columns (what the step did before) at the 1B model's heads, batch 64, 400 of 600 columns in use."""
    from server.decode_attention import decode_attention, supported
    from server.fused_step import decode_rows_attention

    if not supported(device, 32, 8, 64):
        return {"supported": False}
    errors = {}
    g = torch.Generator().manual_seed(3)
    for check_dtype in (torch.float32, dtype):
        for rows, heads, kv_heads, head_dim, capacity, column in ((5, 32, 8, 64, 300, 200), (3, 9, 3, 64, 130, 64)):
            q = torch.randn(rows, heads, head_dim, generator=g).to(device, check_dtype)
            k = torch.randn(rows, kv_heads, capacity, head_dim, generator=g).to(device, check_dtype)
            v = torch.randn(rows, kv_heads, capacity, head_dim, generator=g).to(device, check_dtype)
            k[:, :, column + 1 :] = float("nan")
            v[:, :, column + 1 :] = float("nan")
            mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
            for r in range(rows):
                mask[r, (r * 13) % column : column + 1] = True
            got = decode_attention(q, k, v, mask, torch.tensor([column], device=device), head_dim**-0.5)
            end = column + 1
            want = decode_rows_attention(
                q.float(), k[:, :, :end].float(), v[:, :, :end].float(), mask[:, None, None, :end], head_dim**-0.5
            )
            key = f"{str(check_dtype).removeprefix('torch.')}_{rows}x{heads}/{kv_heads}x{head_dim}_c{column}"
            errors[key] = float((got.float() - want).abs().max())
    rows, heads, kv_heads, head_dim, capacity, column = 64, 32, 8, 64, 600, 399
    q = torch.randn(rows, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(rows, kv_heads, capacity, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
    mask[:, : column + 1] = True
    col = torch.tensor([column], device=device)
    scale = head_dim**-0.5
    timings = {
        "kernel_us": _time_us(lambda: decode_attention(q, k, v, mask, col, scale)),
        "sdpa_all_columns_us": _time_us(lambda: decode_rows_attention(q, k, v, mask[:, None, None], scale)),
    }
    kv_bytes = 2 * rows * kv_heads * (column + 1) * head_dim * k.element_size()
    timings["kernel_bytes_floor_us"] = kv_bytes / copy_bandwidth(device, 256 * 2**20) * 1e6
    return {"supported": True, "max_abs_error_vs_sdpa": errors, **timings}


def _time_us(work: Callable[[], Any], launches: int = 20, replays: int = 10) -> float:
    """Mean µs of one ``work`` on the GPU, as inside a replayed step: ``launches`` of it captured in one CUDA
    graph, the graph replayed ``replays`` times between CUDA events. (Timed launch by launch from Python, a
    custom op's dispatch and Triton's launcher cost more than the kernel: 127 µs against SDPA's 95 in the
    fourteenth session's run 3, where in the compiled step the kernel was the faster.)"""
    for _ in range(10):  # warm-up: Triton's autotuning and the allocator, outside the capture
        work()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            work()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (launches * replays)


def check_static_decode(device: torch.device, steps: int = 80) -> dict[str, Any]:
    """Correctness on this device before any timing: on the tiny config in float32, the default runner's decode
    (fixed-shape steps, from CUDA graphs once settled, fused projections) gives the same greedy tokens as the
    eager transformers step on the stock layers, step for step, for rows with prefixes of different lengths,
    through buffer growth and a row leaving.
    (The bf16 benchmark model cannot show this: its random logits are nearly flat, so rounding flips argmaxes.)
    """
    from server.batch import NewRequest
    from server.runner import ModelRunner
    from server.sampling import SamplingParams

    model, stock = build_model(True, device, torch.float32), build_model(True, device, torch.float32)
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    # The default runner and the compiled one on fused layers, against the stock layers' eager step.
    default, eager = ModelRunner(model, *shape, **FUSED), ModelRunner(stock, *shape, static_decode=False, **STOCK)
    compiled = ModelRunner(model, *shape, compile_decode=True, **FUSED)
    g = torch.Generator().manual_seed(2)
    requests = []
    for i, (p, n) in enumerate([(3, 5), (0, 7), (6, 2), (1, 9)]):
        prompt = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        kv = torch.randn(*shape[:1], 2, shape[1], p, shape[2], generator=g) if p else None
        requests.append(NewRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=steps), kv, f"t{i}" if p else None))
    batches = [runner.prefill(requests)[0] for runner in (default, eager, compiled)]
    equal = compiled_equal = 0
    for step in range(steps):
        if step == steps // 2:
            with torch.inference_mode():  # as the engine filters: no recompile for the tensors' dispatch keys
                batches = [b.filter(["r0", "r2", "r3"]) for b in batches]
        want = eager.decode(batches[1])
        equal += int(torch.equal(default.decode(batches[0]), want))
        compiled_equal += int(torch.equal(compiled.decode(batches[2]), want))
    # The same rows in three padded groups, decoded in one step (as the engine does between prompt chunks).
    parts = (requests[:2], requests[2:3], requests[3:])
    groups = [[runner.prefill(part)[0] for part in parts] for runner in (default, eager)]
    groups_equal = 0
    for _ in range(steps):
        got, want = (runner.fused_step(g, [])[0] for runner, g in zip((default, eager), groups, strict=True))
        groups_equal += int(all(torch.equal(a, b) for a, b in zip(got, want, strict=True)))
    decoder = default.static_decoder
    return {
        "steps_token_equal": f"{equal}/{steps}",
        "compiled_steps_token_equal": f"{compiled_equal}/{steps}",
        "group_steps_token_equal": f"{groups_equal}/{steps}",
        "static_decode": decoder is not None,
        "graph_captures": 0 if decoder is None else decoder.captures,
        "graph_replays": 0 if decoder is None else decoder.replays,
        "compiled_still_on": compiled.static_decoder is not None and compiled.static_decoder.compiled,
        "projections_fused": is_fused(model.model.layers[0].self_attn) and is_fused(model.model.layers[0].mlp),
    }


def runner_step_s(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    static_decode: bool | None,
    compile_decode: bool = False,
    *,
    fuse: bool,
    kernel: bool,
    warm: int = 8,
    steps: int = 48,
) -> float:
    """Seconds per decode step of a bare ModelRunner on a settled batch, with the engine's per-step host sync
    (the tokens to the host) but none of its bookkeeping. A fresh batch has 64 free columns (kv_cache.py's
    headroom), so warm + steps stay under it: no growth, and with graphs one capture during the warm steps."""
    from server.batch import NewRequest
    from server.runner import ModelRunner
    from server.sampling import SamplingParams

    cfg = model.config
    runner = ModelRunner(
        model,
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        static_decode=static_decode,
        compile_decode=compile_decode,
        decode_kernel=kernel,
        **(FUSED if fuse else STOCK),
    )
    params = SamplingParams(max_new_tokens=warm + steps + 1)
    batch, _ = runner.prefill([NewRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    device = next(model.parameters()).device
    for _ in range(warm):
        runner.decode(batch).tolist()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.decode(batch).tolist()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure_batch(
    models: Models,
    batch: int,
    prompts: list[list[int]],
    prefixes: list[torch.Tensor],
    new_tokens: int,
    short_tokens: int,
    args: argparse.Namespace,
) -> tuple[dict[str, list[Timing]], dict[str, dict[str, Any]], list[bool]]:
    """Every variant's timings (in alternating order), the graph counters, and graph-vs-eager token agreement."""
    engines = {name: ENGINES[name](models, batch) for name in args.engines}
    # As the server does at startup (--compile-decode): the compiles happen now, not in a timed run.
    for engine in engines.values():
        engine.runner.compile_decode_steps(1)  # a no-op where the step is not compiled
    for engine in engines.values():
        engine.start()
    work = {
        "mixed": lambda: engine_run(engines[MAIN], engine_requests(prompts, new_tokens, prefixes)),
        "single": lambda: engine_run(engines[MAIN], engine_requests(prompts, new_tokens, prefixes[:1])),
        **{
            f"{name}{suffix}": partial(engine_run, engine, engine_requests(prompts, tokens))
            for name, engine in engines.items()
            for suffix, tokens in (("", new_tokens), ("_short", short_tokens))
        },
        "bare": lambda: bare_loop(models.stock, prompts, new_tokens),
    }
    runs: dict[str, list[Timing]] = {key: [] for key in work}
    try:
        for engine in engines.values():  # warm-up
            engine_run(engine, engine_requests(prompts, 2, prefixes))
        bare_loop(models.stock, prompts, 2)
        # The default engine against the stock layers' eager step: do greedy tokens agree (bf16 sums may round
        # differently)?
        check = engine_requests(prompts, 32)
        eager = make_engine(models.stock, *models.shape, models.context, batch, static_decode=False, **STOCK)
        eager.start()
        try:
            graphed, reference = engine_tokens(engines[MAIN], check), engine_tokens(eager, check)
        finally:
            eager.shutdown()
        agree = [a == b for a, b in zip(graphed, reference, strict=True)]
        for r in range(args.repeats):
            for key in list(work) if r % 2 == 0 else reversed(work):  # alternate the order between repeats
                runs[key].append(work[key]())
        if args.profile is not None:
            for name in ("engine", "compiled", "compiled_sdpa", "compiled_stock"):
                if name in engines:
                    path = args.profile / f"profile_{name}_{batch}.txt"
                    profile_steps(path, engines[name], models.stock, prompts, prefixes)
        graphs: dict[str, dict[str, Any]] = {}
        for name, engine in engines.items():
            decoder = engine.runner.static_decoder
            if decoder is not None:
                graphs[name] = {"captures": decoder.captures, "replays": decoder.replays, "compiled": decoder.compiled}
    finally:
        for engine in engines.values():
            engine.shutdown()
    return runs, graphs, agree


def profile_steps(
    path: Path, engine: Engine, model: LlamaForCausalLM, prompts: list[list[int]], prefixes: list[torch.Tensor]
) -> None:
    """Kernel and operator times of short engine runs and a short bare loop: where a decode step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for name, work in (
        ("engine, no prefixes, 32 tokens", lambda: engine_run(engine, engine_requests(prompts, 32))),
        ("engine, distinct prefixes, 32 tokens", lambda: engine_run(engine, engine_requests(prompts, 32, prefixes))),
        ("bare loop, 16 tokens", lambda: bare_loop(model, prompts, 16)),
    ):
        with profile(activities=activities) as prof:
            timing = work()
        table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
        sections.append(f"## {name}: {timing.seconds * 1e3:.1f} ms wall\n\n{table}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
