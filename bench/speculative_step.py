"""What verifying drafts costs a decode step, by how many rows draft: the planner's ``draft_cost``.

    python -m bench.speculative_step [--rows 1,4,8] [--context 100] [--drafts 4] [--repeats 12]

``ModelRunner.speculative_step`` on the default model against a plain fused decode step of the same rows (random
prompts of ``--context`` tokens; drafts are random tokens, so none stands and every step widens the rows by one
column, as a plain step does). Patterns, timed in turn, round after round: no drafts (a plain step), one row
drafting ``--drafts`` tokens, half the rows, all of them. A row feeds only its own drafts, so a step's cost
grows with the drafts verified, not with rows × the longest proposal. Reported: median step ms, its ratio to the
plain step, and that ratio's excess per draft token (what ``SpeculativeConfig.draft_cost`` models).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.harness import log
from bench.inproc import random_prompts
from server.batch import NewRequest
from server.model_loading import load_model
from server.runner import ModelRunner
from server.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,8", help="comma-separated rows decoding")
    p.add_argument("--context", type=int, default=100, help="prompt tokens per row")
    p.add_argument("--drafts", type=int, default=4, help="drafts per drafting row")
    p.add_argument("--repeats", type=int, default=12, help="steps timed per pattern")
    p.add_argument("--groups", type=int, default=1, help="padded groups the rows are split into (as KV groups)")
    args = p.parse_args()
    loaded = load_model(None)
    runner = ModelRunner(loaded.model, loaded.num_layers, loaded.num_kv_heads, loaded.head_dim)
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    rng = random.Random(0)
    log(
        f"context {args.context} tokens, {args.drafts} drafts per drafting row, rows in {args.groups} group(s), "
        f"median of {args.repeats} steps:"
    )
    for rows in (int(r) for r in args.rows.split(",")):
        prompts = random_prompts(rows, args.context, vocab, seed=rows)
        groups = [
            runner.prefill([NewRequest(f"r{i}", prompts[i], SamplingParams()) for i in members])[0]
            for members in (range(g, rows, args.groups) for g in range(min(args.groups, rows)))
        ]
        patterns = {"plain": 0, "one row": 1, "half the rows": max(1, rows // 2), "every row": rows}
        times: dict[str, list[float]] = {name: [] for name in patterns}
        with torch.inference_mode():
            runner.fused_step(groups, [])  # warm-up
            for _ in range(args.repeats):
                for name, drafting in patterns.items():
                    proposals = iter(
                        [rng.randrange(100, vocab) for _ in range(args.drafts)] if r < drafting else []
                        for r in range(rows)
                    )
                    drafts = [[next(proposals) for _ in range(len(g))] for g in groups]
                    start = time.perf_counter()
                    if drafting:
                        runner.speculative_step(groups, drafts)
                    else:
                        runner.fused_step(groups, [])
                    times[name].append(time.perf_counter() - start)
        plain = statistics.median(times["plain"])
        for name, drafting in patterns.items():
            step = statistics.median(times[name])
            tokens = drafting * args.drafts
            excess = f", {(step / plain - 1) / tokens:+.3f} per draft" if tokens else ""
            log(f"  {rows} rows, {name} drafting ({tokens} drafts): {step * 1e3:.1f} ms, {step / plain:.2f}x{excess}")


if __name__ == "__main__":
    main()
