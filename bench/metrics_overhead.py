"""What the Prometheus instrumentation costs the decode loop.

Figures per batch size B:

* ``instr``: the engine's per-step metrics work in isolation, exactly the calls
  ``Engine._consume``/``_emit`` make (one ``forward_pass`` observation of batch
  size, distinct prefixes and padding ratio, B inter-token-latency
  observations, the generated-tokens increment, one clock read), three ways:
  without the ``task`` label (the default), with ``--metrics-task-labels 64``
  (each of the B rows has a task of its own, so B label values per step: the
  worst case) and with ``--metrics-task-labels 4`` (rows past the fourth task
  are summed under "other");
* ``decode``: one ``ModelRunner.decode`` step of the same batch on the tiny
  test-sized model (the worst case: the cheapest step there is) and, with
  ``--default-model``, on the embedded SmolLM2-135M;
* instr / decode, without and with the label.

Then an end-to-end A/B/C on the tiny model: the same concurrent requests
through an engine without metrics, with them and with the ``task`` label,
alternated so drift hits all alike.

    python -m bench.metrics_overhead [--batch 1 8 32] [--steps 64] [--default-model]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from server.batch import Batch
from server.engine import Engine, GenerationRequest
from server.metrics import EngineMetrics, TaskLabels
from server.model_loading import load_model, probe_kv_shape
from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams


def tiny_model() -> PreTrainedModel:
    """The test suite's tiny GQA Llama (2 layers, 4 query / 2 KV heads of 16), built here to keep bench/ standalone."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def new_requests(runner: ModelRunner, batch: int, prefix_len: int, vocab: int, steps: int) -> list[NewRequest]:
    """B requests, each with its own random prefix and a prompt of 16-31 tokens (so rows pad)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(batch):
        kv = torch.randn(runner.num_layers, 2, runner.num_kv_heads, prefix_len, runner.head_dim, generator=g)
        prompt = torch.randint(3, vocab, (16 + i % 16,), generator=g).tolist()
        out.append(NewRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=steps), kv, f"t/task{i}@1"))
    return out


def time_decode(runner: ModelRunner, batch: Batch, steps: int) -> float:
    """Median seconds of one decode step over ``steps`` steps (the KV grows by one column each)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.decode(batch).tolist()  # the engine's one host sync per step
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_instrumentation(batch: Batch, repeats: int, task_labels: int = 0) -> float:
    """Seconds per step of the engine's metrics calls for this batch, on a fresh registry."""
    metrics = EngineMetrics(CollectorRegistry(), TaskLabels(task_labels) if task_labels else None)
    rows, slots = batch.rows, len(batch) * batch.width
    real = sum(batch.next_positions.tolist())
    last = time.perf_counter()
    start = time.perf_counter()
    for _ in range(repeats):
        now = time.perf_counter()
        metrics.forward_pass(rows, slots, real)
        for _row in rows:
            metrics.inter_token_latency.observe(now - last)
        metrics.generated(rows)
        last = now
    return (time.perf_counter() - start) / repeats


def per_step_table(name: str, model: PreTrainedModel, batches: list[int], steps: int, prefix_len: int) -> None:
    runner = ModelRunner(model, *probe_kv_shape(model))
    vocab = int(model.config.vocab_size)
    print(f"\n{name}: per decode step, P={prefix_len}, prompts 16-31 tokens, {steps} steps")
    header = ["B", "instr us", "task us", "task/4 us", "decode ms", "ratio", "task ratio"]
    print(" ".join(f"{h:>10}" for h in header))
    warm, _ = runner.prefill(new_requests(runner, 2, prefix_len, vocab, steps))
    time_decode(runner, warm, 4)  # first calls pay one-off setup; keep them out of the table
    for b in batches:
        batch, _ = runner.prefill(new_requests(runner, b, prefix_len, vocab, steps))
        decode = time_decode(runner, batch, steps)
        instr = time_instrumentation(batch, repeats=2000)
        labelled = time_instrumentation(batch, repeats=2000, task_labels=64)
        few = time_instrumentation(batch, repeats=2000, task_labels=4)
        print(
            f"{b:>10} {instr * 1e6:>10.1f} {labelled * 1e6:>10.1f} {few * 1e6:>10.1f} {decode * 1e3:>10.2f}"
            f" {instr / decode:>10.3%} {labelled / decode:>10.3%}"
        )


async def engine_run(model: PreTrainedModel, metrics: EngineMetrics | None, requests: int, new_tokens: int) -> float:
    runner = ModelRunner(model, *probe_kv_shape(model))
    engine = Engine(runner, None, eos_token_ids=[], max_context=1024, metrics=metrics)
    engine.start()
    try:
        g = torch.Generator().manual_seed(2)
        batch = []
        for i in range(requests):
            kv = torch.randn(runner.num_layers, 2, runner.num_kv_heads, 8, runner.head_dim, generator=g)
            prompt = torch.randint(3, 256, (16 + i % 16,), generator=g).tolist()
            batch.append(GenerationRequest(prompt, SamplingParams(max_new_tokens=new_tokens), kv, f"t/task{i % 4}@1"))

        async def one(r: GenerationRequest) -> int:
            return len([e async for e in engine.generate(r) if e.token_id is not None])

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in batch))
        return time.perf_counter() - start
    finally:
        engine.shutdown()


def engine_ab(model: PreTrainedModel, requests: int, new_tokens: int, repeats: int) -> None:
    runs: dict[str, list[float]] = {"off": [], "on": [], "task": []}
    variants: dict[str, Callable[[], EngineMetrics | None]] = {
        "off": lambda: None,
        "on": lambda: EngineMetrics(CollectorRegistry()),
        "task": lambda: EngineMetrics(CollectorRegistry(), TaskLabels(64)),
    }
    asyncio.run(engine_run(model, None, requests, 4))  # warm-up
    for _ in range(repeats):
        for name, make in variants.items():
            runs[name].append(asyncio.run(engine_run(model, make(), requests, new_tokens)))
    off, on, task = (statistics.median(runs[name]) for name in ("off", "on", "task"))
    print(f"\nengine A/B, tiny model, {requests} concurrent requests x {new_tokens} tokens, median of {repeats}:")
    print(f"  without metrics {off * 1e3:.1f} ms, with metrics {on * 1e3:.1f} ms, difference {(on - off) / off:+.2%}")
    print(f"  with the task label {task * 1e3:.1f} ms, difference {(task - off) / off:+.2%}")
    print("  (the A/B difference is within run-to-run noise unless it exceeds the per-step ratio above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--default-model", action="store_true", help="also time the embedded SmolLM2-135M")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    per_step_table("tiny Llama (2 layers, hidden 64)", tiny_model(), args.batch, args.steps, args.prefix_len)
    if args.default_model:
        loaded = load_model(None, device="cpu", dtype="float32")
        per_step_table("SmolLM2-135M (default model)", loaded.model, args.batch, args.steps, args.prefix_len)
    engine_ab(tiny_model(), args.requests, args.steps, args.repeats)


if __name__ == "__main__":
    main()
