"""What the prompt cache saves, and what it costs when nothing repeats, side by side in one engine.

    python -m bench.prompt_cache [--rounds 3] [--batch 32] [--new-tokens 32] [--choices 4]

The engine runs in process on the default model (fused chunked prefill, the server's CPU defaults); the cache is
switched on and off between rounds, which alternate:

- **shared head**: ``--batch`` requests whose prompts share a 384-token head (a long system prompt or document)
  and end in 16 tokens of their own. With the cache, one request run first leaves the head's K/V behind (as an
  earlier request would have), and the batch then computes only its tails.
- **unique**: ``--batch`` requests of 200 distinct random tokens: nothing to reuse, so the cache costs what
  storing every prompt's blocks costs (it is emptied before each such round).

Reported: tokens/s of the whole batch and time to first token (mean, max), with the cache against without.

Then through the app (OpenAI completions, in process): one request for ``--choices`` choices of a 300-token
prompt, 16 tokens each. With the cache, the later choices start once the first has its first token and take its
prompt from the cache; without, every choice prefills the prompt. Reported: the request's wall time, each way.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence

from fastapi.testclient import TestClient

from bench.harness import log
from bench.inproc import cpu_served_engine, random_prompts
from server.api.app import create_app
from server.config import ServeConfig
from server.engine import Engine, GenerationRequest
from server.model_loading import LoadedModel, load_model
from server.prompt_cache import PromptCache
from server.sampling import SamplingParams

VOCAB = 49152


async def _one(engine: Engine, request: GenerationRequest, start: float) -> tuple[float, int]:
    first, tokens = 0.0, 0
    async for event in engine.generate(request):
        if event.token_id is not None:
            tokens += 1
            if tokens == 1:
                first = time.perf_counter() - start
    return first, tokens


def run(engine: Engine, requests: Sequence[GenerationRequest]) -> tuple[float, list[float]]:
    """Tokens/s of the batch, and each request's time to first token (s)."""

    async def go() -> tuple[float, list[float]]:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(engine, r, start) for r in requests))
        elapsed = time.perf_counter() - start
        return sum(n for _, n in results) / elapsed, [t for t, _ in results]

    return asyncio.run(go())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--choices", type=int, default=4, help="0: skip the n-choices comparison")
    args = p.parse_args()
    loaded = load_model(None)
    engine = cpu_served_engine(loaded, args.batch)
    cache = PromptCache(256 * 2**20)
    engine.start()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    head = random_prompts(1, 384, VOCAB, seed=1)[0]
    shared = [GenerationRequest(head + tail, params) for tail in random_prompts(args.batch, 16, VOCAB, seed=2)]
    warm = GenerationRequest(head + random_prompts(1, 16, VOCAB, seed=3)[0], params)
    results: dict[str, list[tuple[float, list[float]]]] = {}
    try:
        run(engine, shared[:4])  # warm-up
        for round_ in range(args.rounds):
            for workload in ("shared head", "unique"):
                for cached in (False, True):
                    cache.clear()
                    engine.prompt_cache = cache if cached else None
                    if workload == "shared head":
                        run(engine, [warm])  # what an earlier request would have left behind (or not)
                        requests = shared
                    else:
                        prompts = random_prompts(args.batch, 200, VOCAB, seed=100 + round_)
                        requests = [GenerationRequest(prompt, params) for prompt in prompts]
                    results.setdefault(f"{workload}, cache {'on' if cached else 'off'}", []).append(
                        run(engine, requests)
                    )
    finally:
        engine.shutdown()
    log(f"{args.batch} requests x {args.new_tokens} new tokens, medians of {args.rounds} rounds:")
    summary = {}
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        ttft = statistics.median(statistics.mean(t) for _, t in runs)
        worst = statistics.median(max(t) for _, t in runs)
        summary[name] = rate, ttft
        log(
            f"  {name}: {rate:.1f} tok/s, TTFT mean {ttft:.2f} s, max {worst:.2f} s "
            f"(tok/s per round {[round(r, 1) for r, _ in runs]})"
        )
    for workload in ("shared head", "unique"):
        (off_rate, off_ttft), (on_rate, on_ttft) = summary[f"{workload}, cache off"], summary[f"{workload}, cache on"]
        log(f"  {workload}: cache on / off: tok/s {on_rate / off_rate:.3f}x, mean TTFT {on_ttft / off_ttft:.3f}x")
    if args.choices:
        n_choices(loaded, args.rounds, args.choices)


def n_choices(loaded: LoadedModel, rounds: int, n: int) -> None:
    words = " ".join(f"w{i}" for i in range(100))  # ~300 tokens
    body = {"model": loaded.name, "prompt": words, "max_tokens": 16, "temperature": 1.0, "seed": 1, "n": n}
    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as store, TestClient(create_app(ServeConfig(store=store), model=loaded)) as c:
        engine = c.app.state.server.engine  # type: ignore[attr-defined]
        cache = engine.prompt_cache
        c.post("/v1/completions", json={**body, "n": 1})  # warm-up
        for _ in range(rounds):
            for name in ("off", "on"):
                cache.clear()
                engine.prompt_cache = cache if name == "on" else None
                start = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                times[name].append(time.perf_counter() - start)
                assert r.status_code == 200, r.text
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    log(
        f"n={n} choices of a {r.json()['usage']['prompt_tokens']}-token prompt, 16 tokens each: "
        f"{off:.2f} s without the cache, {on:.2f} s with it ({on / off:.3f}x; rounds off "
        f"{[round(t, 2) for t in times['off']]}, on {[round(t, 2) for t in times['on']]})"
    )


if __name__ == "__main__":
    main()
