"""What speculative decoding by prompt lookup gains, and what it costs where nothing repeats, side by side.

    python -m bench.speculative [--rounds 3] [--records 12] [--new-tokens 64]

The engine runs in process on the default model (fused chunked prefill, the server's CPU defaults, the model's
tokenizer and EOS); speculation (``--speculative-tokens 4``, the server's default on a CPU) is switched on and
off between rounds, which alternate. Requests are greedy unless said otherwise. Workloads:

- **table-to-text**: the shipped trained prefix (examples/prefixes/table-to-text.safetensors, P = 10) on test
  records of examples/table_to_text (unseen restaurant names, which the description copies), stop at a newline;
- **code edit**: the base model asked, in a chat, to add type hints to short Python functions (it rewrites
  them);
- **open chat**: the base model asked open questions (its answers repeat little of the question);
- **sampled chat**: the same at temperature 0.8, top-p 0.95, each request seeded (what an OpenAI client
  sends by default, seed aside): a draft stands when the row's seeded draw at that step equals it;
- **random**: prompts of 32 random tokens, ``--new-tokens`` each with EOS ignored (S1's kind of request): the
  model soon loops, which lookup predicts;
- **JSON extraction**: the base model asked, in a chat, for a person's name, age and city from a sentence, held
  to a JSON schema (structured output: each query verified under the grammar's mask);
- **tool calls**: chats with two tools and ``tool_choice: "auto"`` (the hermes format, told in a system message
  as the server tells it, one earlier call in the history), asking for the weather in a city: the model calls;
- **half scored**, **half penalised**: the open questions, every other one asking for log-probabilities (5
  alternatives per token), or with a repetition penalty of 1.1: those rows never draft, nor do rows beside them;
- **predicted chat**: the open questions, each with its own answer (found greedily before the rounds, as text,
  tokenised as the server tokenises a prediction) as OpenAI's ``prediction``: a client regenerating a reply it
  has (the best case); **predicted edit**: the same with every fourth word of each answer replaced (a guess
  a quarter wrong, as of a file about to be edited).

Before each run the engine forgets the tasks' earlier outputs (``TaskHistory``): drafts come from the request's
own context and from the outputs of the run's earlier requests (of the same task), never from an earlier run of
the same request. Each runs one request at a time (a lone stream, where speculation applies), 4 and 8 at once
(``--concurrency``). Reported: tokens/s on / off, the drafts' acceptance rate, and whether every request's tokens
were the same both ways (they must be: each row samples what it would one token at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry
from transformers import PreTrainedTokenizerBase

from bench.harness import log
from bench.inproc import cpu_served_engine, random_prompts
from examples.table_to_text.restaurants import PROMPT_SUFFIX, build_split
from prefix_store.artifact import decode_artifact
from server.api.tool_formats import TOOL_CALL_FORMATS, with_tools_in_text
from server.config import ServeConfig
from server.engine import Engine, GenerationRequest
from server.metrics import EngineMetrics
from server.model_loading import LoadedModel, load_model
from server.sampling import SamplingParams
from server.speculative import DEFAULT_CPU_SPECULATIVE_TOKENS, SpeculativeConfig, TaskHistory
from server.structured_output import GrammarCompiler, GrammarSpec
from tests.test_e2e_serve import WEATHER_SHOT, WEATHER_TOOLS

PREFIX = Path(__file__).resolve().parent.parent / "examples" / "prefixes" / "table-to-text.safetensors"
FUNCTIONS = [
    "def area(width, height):\n    return width * height\n",
    "def greet(name, excited):\n    if excited:\n        return 'Hello, ' + name + '!'\n    return 'Hello, ' + name\n",
    "def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal + subtotal * tax\n",
    "def first_word(text):\n    words = text.split()\n    return words[0] if words else ''\n",
    "def scale(values, factor):\n    return [value * factor for value in values]\n",
    "def is_adult(age, country):\n    limit = 21 if country == 'US' else 18\n    return age >= limit\n",
]

PEOPLE = [
    "Maria Lopez, 34, moved to Valencia last spring.",
    "At 58, Tomasz Nowak still runs his bakery in Krakow.",
    "Aiko Tanaka (27) works as a nurse in Osaka.",
    "The new mayor of Lyon, Claire Martin, is 45.",
    "Olusegun Adeyemi, a 39-year-old teacher, lives in Lagos.",
    "Sven Olsen turned 61 this year; he has always lived in Bergen.",
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Hanoi", "Quito"]

QUESTIONS = [
    "Why is the sky blue?",
    "Give me three tips for learning to cook.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a hash table is.",
    "How do plants make their food?",
    "Write a short poem about autumn.",
]


def workloads(loaded: LoadedModel, records: int, new_tokens: int) -> dict[str, list[GenerationRequest]]:
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    artifact = decode_artifact(PREFIX.read_bytes())
    prefix_id = f"bench/table-to-text@1#{artifact.metadata.sha256[:12]}"
    table = [
        GenerationRequest(
            list(tokenizer(str(row["mr"]) + PROMPT_SUFFIX).input_ids),
            SamplingParams(max_new_tokens=new_tokens, stop=("\n",)),
            artifact.key_values,
            prefix_id,
        )
        for row in build_split("test", records, seed=0)
    ]
    edits = [
        _chat(tokenizer, f"Add type hints to this Python function:\n\n{source}", 2 * new_tokens) for source in FUNCTIONS
    ]
    chats = [_chat(tokenizer, question, 2 * new_tokens) for question in QUESTIONS]
    sampled = [
        dataclasses.replace(chat, params=dataclasses.replace(chat.params, temperature=0.8, top_p=0.95, seed=seed))
        for seed, chat in enumerate(chats)
    ]
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    noise = [
        GenerationRequest(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        for p in random_prompts(len(FUNCTIONS), 32, vocab, seed=5)
    ]
    grammars = GrammarCompiler.for_tokenizer(tokenizer, vocab, loaded.eos_token_ids)
    person = grammars.compile(GrammarSpec.json_schema(PERSON))
    extraction = [
        _chat(tokenizer, f"Give the person's name, age and city as JSON: {text}", 2 * new_tokens) for text in PEOPLE
    ]
    extraction = [dataclasses.replace(r, params=dataclasses.replace(r.params, grammar=person)) for r in extraction]
    hermes = TOOL_CALL_FORMATS["hermes"]
    calls = grammars.compile(hermes.grammar(WEATHER_TOOLS, parallel_tool_calls=True))
    tool_chats = []
    for city in CITIES:
        messages = with_tools_in_text(
            hermes, [*WEATHER_SHOT, {"role": "user", "content": f"What's the weather in {city}?"}], WEATHER_TOOLS
        )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        tool_chats.append(GenerationRequest(ids, SamplingParams(max_new_tokens=2 * new_tokens, grammar=calls)))
    scored = [
        dataclasses.replace(c, params=dataclasses.replace(c.params, logprobs=5)) if i % 2 else c
        for i, c in enumerate(chats)
    ]
    penalised = [
        dataclasses.replace(c, params=dataclasses.replace(c.params, repetition_penalty=1.1)) if i % 2 else c
        for i, c in enumerate(chats)
    ]
    return {
        "table-to-text": table,
        "code edit": edits,
        "open chat": chats,
        "sampled chat": sampled,
        "random": noise,
        "JSON extraction": extraction,
        "tool calls": tool_chats,
        "half scored": scored,
        "half penalised": penalised,
    }


def predicted_workloads(
    engine: Engine, tokenizer: PreTrainedTokenizerBase, chats: Sequence[GenerationRequest]
) -> dict[str, list[GenerationRequest]]:
    """The chats with their own greedy answers as predictions, whole and with every fourth word replaced."""
    engine.speculative = SpeculativeConfig()
    _, answers = run(engine, chats, 4)
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
    edited = [" ".join("thing" if i % 4 == 3 else w for i, w in enumerate(t.split(" "))) for t in texts]

    def predicted(guesses: list[str]) -> list[GenerationRequest]:
        return [
            dataclasses.replace(chat, prediction=tuple(tokenizer(guess, add_special_tokens=False).input_ids))
            for chat, guess in zip(chats, guesses, strict=True)
        ]

    return {"predicted chat": predicted(texts), "predicted edit": predicted(edited)}


def _chat(tokenizer: PreTrainedTokenizerBase, content: str, new_tokens: int) -> GenerationRequest:
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids  # as the server encodes a chat
    return GenerationRequest(list(ids), SamplingParams(max_new_tokens=new_tokens))


async def _tokens(engine: Engine, request: GenerationRequest) -> list[int]:
    return [e.token_id async for e in engine.generate(request) if e.token_id is not None]


def run(engine: Engine, requests: Sequence[GenerationRequest], concurrency: int) -> tuple[float, list[list[int]]]:
    """Tokens/s over the requests, ``concurrency`` in flight at a time, and each request's tokens."""

    async def go() -> list[list[int]]:
        gate = asyncio.Semaphore(concurrency)

        async def one(request: GenerationRequest) -> list[int]:
            async with gate:
                return await _tokens(engine, request)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    start = time.perf_counter()
    outputs = asyncio.run(go())
    return sum(len(o) for o in outputs) / (time.perf_counter() - start), outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--records", type=int, default=12, help="table-to-text test records per round")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=DEFAULT_CPU_SPECULATIVE_TOKENS, help="drafts per row and step")
    p.add_argument("--max-rows", type=int, default=ServeConfig.speculative_max_rows)
    p.add_argument("--ngram-min", type=int, default=SpeculativeConfig.ngram_min, help="shortest suffix looked up")
    p.add_argument("--only", default="", help="comma-separated workloads to run (default: all)")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated requests in flight at a time")
    args = p.parse_args()
    loaded = load_model(None)
    metrics = EngineMetrics(CollectorRegistry())
    speculative = SpeculativeConfig(args.tokens, args.max_rows, ngram_min=args.ngram_min)
    engine = cpu_served_engine(loaded, 32, text=True, metrics=metrics, speculative=speculative)
    engine.start()
    loads = workloads(loaded, args.records, args.new_tokens)
    if not args.only or "predicted" in args.only:
        loads.update(predicted_workloads(engine, loaded.tokenizer, loads["open chat"]))
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.only:
        loads = {name: loads[name] for name in args.only.split(",")}
    rates: dict[tuple[str, int, bool], list[float]] = {}
    acceptance: dict[tuple[str, int], list[tuple[float, float]]] = {}
    same = {name: True for name in loads}
    try:
        run(engine, next(iter(loads.values()))[:2], 1)  # warm-up
        for _ in range(args.rounds):
            for name, requests in loads.items():
                for concurrency in levels:
                    outputs = {}
                    order = [False, True] if random.random() < 0.5 else [True, False]
                    for on in order:
                        engine.speculative = speculative if on else SpeculativeConfig()
                        # Outputs of this run's earlier requests only: not of the same requests run before.
                        engine.task_history = TaskHistory(speculative)
                        drafted = metrics.speculative_draft_tokens._value.get()
                        kept = metrics.speculative_accepted_tokens._value.get()
                        rate, outputs[on] = run(engine, requests, concurrency)
                        rates.setdefault((name, concurrency, on), []).append(rate)
                        if on:
                            acceptance.setdefault((name, concurrency), []).append(
                                (
                                    metrics.speculative_draft_tokens._value.get() - drafted,
                                    metrics.speculative_accepted_tokens._value.get() - kept,
                                )
                            )
                    same[name] &= outputs[True] == outputs[False]
    finally:
        engine.shutdown()
    log(f"k = {speculative.tokens} drafts while at most {speculative.max_rows} rows decode; medians of "
        f"{args.rounds} rounds (tokens/s per round in brackets):")  # fmt: skip
    for name in loads:
        for concurrency in levels:
            on, off = rates[(name, concurrency, True)], rates[(name, concurrency, False)]
            drafted = sum(d for d, _ in acceptance[(name, concurrency)])
            kept = sum(a for _, a in acceptance[(name, concurrency)])
            log(
                f"  {name}, {concurrency} at a time: on {statistics.median(on):.1f} tok/s, off "
                f"{statistics.median(off):.1f}: {statistics.median(on) / statistics.median(off):.2f}x; "
                f"drafts accepted {kept:.0f}/{drafted:.0f} ({kept / max(drafted, 1):.0%}) "
                f"(on {[round(r, 1) for r in on]}, off {[round(r, 1) for r in off]})"
            )
        log(f"  {name}: every request's tokens the same with and without speculation: {same[name]}")


if __name__ == "__main__":
    main()
