"""What structured output costs: compiling a constraint, and a sampling call with rows held to one, side by side.

    python -m bench.structured_output [--rounds 3]

Compilation (the default model's tokenizer, 49,152 tokens): the first compile of a server (it builds xgrammar's
tables of the vocabulary), a new schema after that, and the same schema again (xgrammar's cache). The API compiles
off the engine thread, so this is time to first token of such a request, not time taken from other streams.

Sampling: for batches of 1-64 rows of random logits, the median time of ``sample`` with no row constrained, with one
row held to a JSON schema, and with every row held to it; the three take turns, ``--rounds`` times, and the best
median of each is reported with the extra over the plain call. The schema's strings are free, so the matchers
stay busy; a matcher that reaches its end is reset between calls, outside the timing. A decode step of the default
model takes ~20 ms at 1 row and ~50 ms at 32 on the 2-core CI machine (bench/decode_step.py), for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import log
from server.model_loading import load_tokenizer
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


if __name__ == "__main__":
    main()
