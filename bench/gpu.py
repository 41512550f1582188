"""GPU benchmark: a random-initialised Llama-3.2-1B-shaped model, the engine vs the bare transformers loop.

No download and no network: the model is built from a ``LlamaConfig`` with random weights (bf16 on CUDA).
First, on the device, a float32 check on a tiny config: the default runner's fixed-shape decode steps (CUDA
graphs) give the eager step's greedy tokens. Then, for each batch size, it prints:

* engine tokens/s with all-distinct prefixes ("mixed") and with one shared prefix ("single"), and their ratio;
* engine tokens/s without prefixes vs the bare transformers loop (``DynamicCache``, left padding, mask) on
  identical work, and their ratio, for five engines side by side: the default (graph-replayed decode steps,
  each launched before the last one's tokens are handed out), the same with steps in turn (no overlap), the
  default with the step compiled first (``--compile-decode``: Inductor's fused kernels in the graph), the
  eager transformers decode step, and the server's fused defaults (prompt chunks, KV groups);
* the decode step time (engines and bare loop, prefill excluded) against the memory-bandwidth floor:
  (bytes of weights + bytes of KV read per step) / measured device copy bandwidth; and the runner's step alone
  in steady state (no joins, growth or captures): graphs, compiled graphs and eager.

With --profile DIR, torch.profiler tables of a few steps per batch size (the compiled engine, the bare loop).

    bench/gpu.sh                      # H100: batch 64 and 128, bf16
    bench/gpu.sh --device cpu --tiny  # a CPU smoke run on a tiny config
"""

from __future__ import annotations

import argparse
import json
import time
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
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = [int(b) for b in (args.batches or ("4,8" if args.tiny else "64,128")).split(",")]
    prompt_len = args.prompt_len or (16 if args.tiny else 128)
    new_tokens = args.new_tokens or (16 if args.tiny else 256)
    short_tokens = max(2, new_tokens // 4)

    check = check_static_decode(device)
    print(f"check: {check}", flush=True)
    model = build_model(args.tiny, device, dtype)
    cfg = model.config
    layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    elem = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())  # tied embedding counted once
    bandwidth = copy_bandwidth(device, 256 * 2**20 if device.type == "cuda" else 64 * 2**20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {dtype}, torch {torch.__version__}", flush=True)
    print(f"weights {weight_bytes / 2**20:.1f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)

    results: dict[str, Any] = {
        "device": name,
        "dtype": str(dtype),
        "config": TINY if args.tiny else LLAMA_1B,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefix_len": args.prefix_len,
        "static_decode_check": check,
        "batches": {},
    }
    g = torch.Generator().manual_seed(1)
    for batch in batches:
        prompts = random_prompts(batch, prompt_len, cfg.vocab_size)
        prefixes = [
            (torch.randn(layers, 2, kv_heads, args.prefix_len, head_dim, generator=g) * 0.5).to(dtype)
            for _ in range(batch)
        ]
        runs, graphs, agree = measure_batch(model, batch, prompts, prefixes, new_tokens, short_tokens, args)
        # The runner's step alone, in steady state (no joins, no growth, no capture): what the replay costs.
        # static_decode: the default (graphs on CUDA), or off; and whether the step is compiled first.
        variants = (("graphs", None, False), ("compiled", None, True), ("eager", False, False))
        runner_step = {name: runner_step_s(model, prompts, static, comp) for name, static, comp in variants}

        fastest = {key: min(timings, key=lambda t: t.seconds) for key, timings in runs.items()}
        # Decode step time without prefill, from the difference of two run lengths.
        engine_step, in_turn_step, compiled_step, eager_step, fused_step = (
            (fastest[name].seconds - fastest[f"{name}_short"].seconds) / (new_tokens - short_tokens)
            for name in ("engine", "in_turn", "compiled", "eager", "fused")
        )
        b = fastest["bare"]
        bare_step = (b.seconds - (b.prefill_s or 0.0)) / (new_tokens - 1)
        mean_context = prompt_len + new_tokens / 2
        kv_bytes = layers * 2 * kv_heads * head_dim * mean_context * batch * elem
        floor = (weight_bytes + kv_bytes) / bandwidth
        row = {
            "mixed_tokens_per_s": fastest["mixed"].tokens_per_s,
            "single_tokens_per_s": fastest["single"].tokens_per_s,
            "mixed_over_single": fastest["mixed"].tokens_per_s / fastest["single"].tokens_per_s,
            "engine_tokens_per_s": fastest["engine"].tokens_per_s,
            "bare_tokens_per_s": b.tokens_per_s,
            "engine_over_bare": fastest["engine"].tokens_per_s / b.tokens_per_s,
            "in_turn_tokens_per_s": fastest["in_turn"].tokens_per_s,
            "compiled_tokens_per_s": fastest["compiled"].tokens_per_s,
            "compiled_over_bare": fastest["compiled"].tokens_per_s / b.tokens_per_s,
            "eager_tokens_per_s": fastest["eager"].tokens_per_s,
            "eager_over_bare": fastest["eager"].tokens_per_s / b.tokens_per_s,
            "fused_tokens_per_s": fastest["fused"].tokens_per_s,
            "fused_over_bare": fastest["fused"].tokens_per_s / b.tokens_per_s,
            "engine_step_s": engine_step,
            "in_turn_step_s": in_turn_step,
            "compiled_step_s": compiled_step,
            "eager_step_s": eager_step,
            "fused_step_s": fused_step,
            "bare_step_s": bare_step,
            "floor_step_s": floor,
            "kv_bytes_per_step_at_mean_context": kv_bytes,
            "engine_step_over_floor": engine_step / floor,
            "compiled_step_over_floor": compiled_step / floor,
            "bare_step_over_floor": bare_step / floor,
            "graphs": graphs,
            "runner_step_s": runner_step,
            "runner_graph_step_over_floor": runner_step["graphs"] / floor,
            "runner_compiled_step_over_floor": runner_step["compiled"] / floor,
            "rows_agreeing_graph_vs_eager_32_tokens": f"{sum(agree)}/{len(agree)}",
            "runs_s": {key: [round(t.seconds, 4) for t in timings] for key, timings in runs.items()},
        }
        results["batches"][str(batch)] = row
        print(
            f"batch {batch}: mixed {row['mixed_tokens_per_s']:.0f} tok/s, single {row['single_tokens_per_s']:.0f}, "
            f"mixed/single {row['mixed_over_single']:.3f}; engine {row['engine_tokens_per_s']:.0f} vs bare "
            f"{row['bare_tokens_per_s']:.0f} tok/s = {row['engine_over_bare']:.2f}x (compiled "
            f"{row['compiled_over_bare']:.2f}x, eager steps "
            f"{row['eager_over_bare']:.2f}x, fused steps {row['fused_over_bare']:.2f}x); decode step engine "
            f"{engine_step * 1e3:.2f} ms, in turn {in_turn_step * 1e3:.2f}, compiled {compiled_step * 1e3:.2f} "
            f"({row['compiled_step_over_floor']:.2f}x "
            f"floor), eager {eager_step * 1e3:.2f}, fused {fused_step * 1e3:.2f} ms, bare "
            f"{bare_step * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms (engine {row['engine_step_over_floor']:.2f}x "
            f"floor); runner step in steady state: graphs {runner_step['graphs'] * 1e3:.2f} ms "
            f"({row['runner_graph_step_over_floor']:.2f}x floor), compiled {runner_step['compiled'] * 1e3:.2f} ms "
            f"({row['runner_compiled_step_over_floor']:.2f}x floor), eager {runner_step['eager'] * 1e3:.2f} ms; "
            f"graphs {graphs}; rows agreeing {row['rows_agreeing_graph_vs_eager_32_tokens']}; "
            f"runs {row['runs_s']}",
            flush=True,
        )
        if args.out is not None:  # after every batch, so a run cut short still leaves what it measured
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def check_static_decode(device: torch.device, steps: int = 80) -> dict[str, Any]:
    """Correctness on this device before any timing: on the tiny config in float32, the default runner's decode
    (fixed-shape steps, from CUDA graphs once settled) gives the same greedy tokens as the eager transformers
    step, step for step, for rows with prefixes of different lengths, through buffer growth and a row leaving.
    (The bf16 benchmark model cannot show this: its random logits are nearly flat, so rounding flips argmaxes.)
    """
    from server.batch import NewRequest
    from server.runner import ModelRunner
    from server.sampling import SamplingParams

    model = build_model(True, device, torch.float32)
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    default, eager = ModelRunner(model, *shape), ModelRunner(model, *shape, static_decode=False)
    compiled = ModelRunner(model, *shape, compile_decode=True)
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
    }


def runner_step_s(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    static_decode: bool | None,
    compile_decode: bool = False,
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
    model: LlamaForCausalLM,
    batch: int,
    prompts: list[list[int]],
    prefixes: list[torch.Tensor],
    new_tokens: int,
    short_tokens: int,
    args: argparse.Namespace,
) -> tuple[dict[str, list[Timing]], dict[str, dict[str, Any]], list[bool]]:
    """Every variant's timings (in alternating order), the graph counters, and graph-vs-eager token agreement."""
    cfg = model.config
    layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    context = cfg.max_position_embeddings
    engines = {
        # The default runner: fixed-shape decode steps, replayed from CUDA graphs on a GPU.
        "engine": make_engine(model, layers, kv_heads, head_dim, context, batch),
        # The same with each step's tokens handed out before the next step is launched (no overlap).
        "in_turn": make_engine(model, layers, kv_heads, head_dim, context, batch, overlap_steps=False),
        # The default, the step compiled first (Inductor's fused kernels, then replayed from graphs).
        "compiled": make_engine(model, layers, kv_heads, head_dim, context, batch, compile_decode=True),
        # The eager transformers decode step the engine used before graphs.
        "eager": make_engine(model, layers, kv_heads, head_dim, context, batch, static_decode=False),
        # The server's defaults: prompts enter in chunks fused into decode steps, rows in padded groups.
        "fused": make_engine(model, layers, kv_heads, head_dim, context, batch, **FUSED_SCHEDULER),
    }
    # As the server does at startup (--compile-decode): the compiles happen now, not in a timed run.
    engines["compiled"].runner.compile_decode_steps(1)
    for engine in engines.values():
        engine.start()
    work = {
        "mixed": lambda: engine_run(engines["engine"], engine_requests(prompts, new_tokens, prefixes)),
        "single": lambda: engine_run(engines["engine"], engine_requests(prompts, new_tokens, prefixes[:1])),
        **{
            f"{name}{suffix}": partial(engine_run, engine, engine_requests(prompts, tokens))
            for name, engine in engines.items()
            for suffix, tokens in (("", new_tokens), ("_short", short_tokens))
        },
        "bare": lambda: bare_loop(model, prompts, new_tokens),
    }
    runs: dict[str, list[Timing]] = {key: [] for key in work}
    try:
        for engine in engines.values():  # warm-up
            engine_run(engine, engine_requests(prompts, 2, prefixes))
        bare_loop(model, prompts, 2)
        # Graph replay against the eager step: do greedy tokens agree (bf16 sums may round differently)?
        check = engine_requests(prompts, 32)
        graphed, eager = (engine_tokens(engines[k], check) for k in ("engine", "eager"))
        agree = [a == b for a, b in zip(graphed, eager, strict=True)]
        for r in range(args.repeats):
            for key in list(work) if r % 2 == 0 else reversed(work):  # alternate the order between repeats
                runs[key].append(work[key]())
        if args.profile is not None:
            profile_steps(args.profile / f"profile_{batch}.txt", engines["compiled"], model, prompts, prefixes)
        graphs: dict[str, dict[str, Any]] = {}
        for name in ("engine", "compiled"):
            decoder = engines[name].runner.static_decoder
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
