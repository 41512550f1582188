"""The real default model: mixed prefixes in one engine batch equal the uncached PEFT-forward oracle."""

from __future__ import annotations

import asyncio

import torch

from server.engine import Engine, GenerationRequest
from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams
from tests.tiny_models import oracle_greedy, peft_prefix_model, prefix_kv_of

STEPS = 6


def test_default_model_shape(default_model) -> None:
    fp = default_model.fingerprint
    assert (fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.vocab_size) == ("llama", 30, 3, 64, 49152)
    assert default_model.dtype == torch.float32 and not any(p.requires_grad for p in default_model.model.parameters())


def test_default_model_mixed_batch_matches_peft_oracle(default_model) -> None:
    model, tokenizer = default_model.model, default_model.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):", "Translate to German: good morning", "Once upon"]
    prefix_lens = [10, 0, 3, 25]
    cases = []
    for i, (text, p) in enumerate(zip(prompts, prefix_lens, strict=True)):
        ids = tokenizer(text).input_ids
        if p:
            peft = peft_prefix_model(model, p, seed=40 + i)
            kv = prefix_kv_of(peft)
            want, want_logits = oracle_greedy(peft, ids, STEPS)
        else:
            kv = None
            want, want_logits = oracle_greedy(model, ids, STEPS)
        cases.append((ids, kv, want, want_logits))

    runner = ModelRunner(model, default_model.num_layers, default_model.num_kv_heads, default_model.head_dim)
    # Logits first (near-ties could flip a token): prefill of all four rows together.
    requests = [
        NewRequest(f"r{i}", ids, SamplingParams(max_new_tokens=STEPS), kv, None if kv is None else f"t{i}")
        for i, (ids, kv, _, _) in enumerate(cases)
    ]
    _, first_logits = runner._prefill_forward(requests)
    # 30 fp32 layers computed at other batch shapes (other GEMM blocking) drift by ~1e-3 on logits of
    # magnitude ~20; a misplaced prefix or position moves them by whole units.
    for row, (_, _, _, want_logits) in zip(first_logits, cases, strict=True):
        torch.testing.assert_close(row, want_logits[0], rtol=1e-3, atol=5e-3)

    engine = Engine(runner, None, eos_token_ids=[], max_context=default_model.max_context)
    engine.start()
    try:

        async def run_all():
            async def one(ids, kv, i):
                req = GenerationRequest(ids, SamplingParams(max_new_tokens=STEPS), kv, None if kv is None else f"t{i}")
                return [e.token_id async for e in engine.generate(req) if e.token_id is not None]

            return await asyncio.gather(*(one(ids, kv, i) for i, (ids, kv, _, _) in enumerate(cases)))

        got = asyncio.run(run_all())
    finally:
        engine.shutdown()
    for i, (_, _, want, _) in enumerate(cases):
        assert got[i] == want, f"request {i}"
