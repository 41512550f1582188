"""What structured output costs: compiling a constraint, and a sampling call with rows held to one, side by side.

    python -m bench.structured_output [--rounds 3] [--served-rounds 3]

Compilation (the default model's tokenizer, 49,152 tokens): the first compile of a server (it builds xgrammar's
tables of the vocabulary), a new schema after that, and the same schema again (xgrammar's cache). The API compiles
off the engine thread, so this is time to first token of such a request, not time taken from other streams.

Sampling: for batches of 1-64 rows of random logits, the median time of ``sample`` with no row constrained, with one
row held to a JSON schema, and with every row held to it; the three take turns, ``--rounds`` times, and the best
median of each is reported with the extra over the plain call. The schema's strings are free, so the matchers
stay busy; a matcher that reaches its end is reset between calls, outside the timing. A decode step of the default
model takes ~20 ms at 1 row and ~50 ms at 32 on the 2-core CI machine (bench/decode_step.py), for scale.

Served (the engine in process, the default model): 32 requests of 32 new tokens each, all free against all held to
a JSON array of at least 200 integers (a mask that allows digits and commas only, never complete within 32
tokens: both sides do the same number of steps), alternating ``--served-rounds`` times; tokens/s of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import log
from bench.inproc import engine_run, make_engine, random_prompts
from server.engine import GenerationRequest
from server.model_loading import load_model, load_tokenizer
from server.sampling import SamplingBatch, SamplingParams, sample
from server.structured_output import GrammarCompiler, GrammarSpec
from server.threads import ENGINE_TORCH_THREADS, pin_torch_threads, release_openmp_pool

VOCAB = 49152
EOS = 2  # the default model's <|im_end|>
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["title", "tags", "score"],
}


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def median_ms(source: torch.Tensor, batch: SamplingBatch, calls: int = 200) -> float:
    logits = torch.empty_like(source)
    times = []
    for _ in range(calls):
        logits.copy_(source)  # the mask goes in place
        if batch.grammars is not None:
            for matcher in batch.grammars.matchers:
                if matcher.is_terminated():
                    matcher.reset()
        start = time.perf_counter()
        sample(logits, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--served-rounds", type=int, default=3, help="0: skip the served comparison")
    args = p.parse_args()
    release_openmp_pool()  # one OpenMP pool, pinned as in the engine thread (server/threads.py)
    pin_torch_threads(ENGINE_TORCH_THREADS)
    tokenizer = load_tokenizer(None)
    compiler = GrammarCompiler.for_tokenizer(tokenizer, VOCAB, [EOS])
    spec = GrammarSpec.json_schema(SCHEMA)
    first = timed(lambda: compiler.compile(spec))
    other = GrammarSpec.json_schema({**SCHEMA, "required": ["title"]})
    new = timed(lambda: compiler.compile(other))
    again = min(timed(lambda: compiler.compile(spec)) for _ in range(5))
    log(f"compile, ms: first of a server {first:.1f}; a new schema {new:.1f}; the same schema again {again:.2f}")

    grammar = compiler.compile(spec)
    cpu = torch.device("cpu")
    log(f"sample() on [B, {VOCAB}] logits, ms (best of {args.rounds} medians):")
    for rows in (1, 16, 32, 64):
        source = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows))
        constrained = SamplingParams(grammar=grammar)
        batches = {
            "plain": SamplingBatch.from_params([SamplingParams()] * rows, cpu),
            "one row": SamplingBatch.from_params([constrained] + [SamplingParams()] * (rows - 1), cpu),
            "every row": SamplingBatch.from_params([constrained] * rows, cpu),
        }
        medians: dict[str, list[float]] = {name: [] for name in batches}
        for _ in range(args.rounds):  # the variants take turns: the machine is noisy
            for name, batch in batches.items():
                medians[name].append(median_ms(source, batch))
        best = {name: min(values) for name, values in medians.items()}
        base = best["plain"]
        log(
            f"  {rows:>2} rows: plain {base:.3f}; one row constrained {best['one row']:.3f} "
            f"(+{best['one row'] - base:.3f}); every row {best['every row']:.3f} (+{best['every row'] - base:.3f})"
        )

    if args.served_rounds:
        served(compiler, args.served_rounds)


def served(compiler: GrammarCompiler, rounds: int, batch: int = 32, new_tokens: int = 32) -> None:
    loaded = load_model(None)
    engine = make_engine(
        loaded.model,
        loaded.num_layers,
        loaded.num_kv_heads,
        loaded.head_dim,
        loaded.max_context,
        batch,
    )
    engine.start()
    numbers = compiler.compile(
        GrammarSpec.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 200})
    )
    prompts = random_prompts(batch, 16, VOCAB)
    variants = {
        "free": SamplingParams(max_new_tokens=new_tokens),
        "JSON": SamplingParams(max_new_tokens=new_tokens, grammar=numbers),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    try:
        engine_run(engine, [GenerationRequest(p, variants["free"]) for p in prompts])  # warm-up
        for _ in range(rounds):
            for name, params in variants.items():
                timing = engine_run(engine, [GenerationRequest(p, params) for p in prompts])
                rates[name].append(timing.tokens_per_s)
    finally:
        engine.shutdown()
    free, constrained = (statistics.median(rates[name]) for name in variants)
    log(
        f"served, {batch} requests x {new_tokens} tokens: free {free:.1f} tok/s, held to a JSON schema "
        f"{constrained:.1f} tok/s (ratio {constrained / free:.3f}; medians of {rounds}: "
        f"free {[round(r, 1) for r in rates['free']]}, JSON {[round(r, 1) for r in rates['JSON']]})"
    )


if __name__ == "__main__":
    main()
