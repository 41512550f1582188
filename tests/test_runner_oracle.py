"""The runner's greedy tokens equal an uncached PEFT-forward loop, with mixed prefixes in one batch."""

from __future__ import annotations

import copy

import pytest
import torch

from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams
from tests.tiny_models import oracle_greedy, peft_prefix_model, prefix_kv_of, tiny_gpt2, tiny_llama

STEPS = 6


def _runner_for(model) -> ModelRunner:
    from server.model_loading import probe_kv_shape

    layers, heads, head_dim = probe_kv_shape(model)
    return ModelRunner(model, layers, heads, head_dim)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("forward_tokens", [None, 9, 20], ids=["one-forward", "row-by-row", "two-rows"])
def test_mixed_prefix_batch_matches_peft_forward(
    make_model, forward_tokens: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also with the CPU prefill split into forwards of 1 or 2 rows (the longest prompt has 9 tokens)."""
    if forward_tokens is not None:
        monkeypatch.setattr("server.runner.CPU_PREFILL_FORWARD_TOKENS", forward_tokens)
    base = make_model()
    gen = torch.Generator().manual_seed(1)
    cases = []  # (prompt, prefix kv or None, oracle tokens, oracle logits)
    for i, (p, n) in enumerate([(3, 5), (0, 7), (6, 2), (1, 9), (0, 3)]):
        prompt = torch.randint(3, 250, (n,), generator=gen).tolist()
        if p:
            peft = peft_prefix_model(copy.deepcopy(base), p, seed=10 + i)
            tokens, logits = oracle_greedy(peft, prompt, STEPS)
            cases.append((prompt, prefix_kv_of(peft), tokens, logits))
        else:
            tokens, logits = oracle_greedy(base, prompt, STEPS)
            cases.append((prompt, None, tokens, logits))

    runner = _runner_for(base)
    requests = [
        NewRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=STEPS), kv, None if kv is None else f"t{i}")
        for i, (prompt, kv, _, _) in enumerate(cases)
    ]
    batch, logits = runner._prefill_forward(requests)
    got_logits = [[row] for row in logits]
    got_tokens = [[t] for t in logits.argmax(-1).tolist()]
    batch.next_input_ids = logits.argmax(-1)
    for _ in range(STEPS - 1):
        mask = torch.cat([batch.attention_mask, torch.ones(len(batch), 1, dtype=torch.int64)], 1)
        step_logits, batch.keys, batch.values = runner._forward(
            batch.next_input_ids[:, None], mask, batch.next_positions[:, None], batch.keys, batch.values
        )
        batch.attention_mask, batch.next_positions = mask, batch.next_positions + 1
        batch.next_input_ids = step_logits.argmax(-1)
        batch.check()
        for i, row in enumerate(step_logits):
            got_logits[i].append(row)
            got_tokens[i].append(int(row.argmax()))

    for i, (_, _, want_tokens, want_logits) in enumerate(cases):
        for got, want in zip(got_logits[i], want_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got_tokens[i] == want_tokens, f"row {i}"


def test_long_decode_across_buffer_growth_matches_oracle() -> None:
    """150 decode steps: the in-place KV buffers grow several times; tokens must not notice."""
    base = tiny_llama(seed=4)
    peft = peft_prefix_model(copy.deepcopy(base), 7, seed=8)
    prompts = [[5, 9, 13, 17], [100, 3, 44]]
    want = [oracle_greedy(peft, prompts[0], 150)[0], oracle_greedy(base, prompts[1], 150)[0]]
    runner = _runner_for(base)
    requests = [
        NewRequest("a", prompts[0], SamplingParams(max_new_tokens=150), prefix_kv_of(peft), "t"),
        NewRequest("b", prompts[1], SamplingParams(max_new_tokens=150)),
    ]
    batch, tokens = runner.prefill(requests)
    got = [[t] for t in tokens.tolist()]
    capacities = {batch.keys[0].shape[2]}
    for _ in range(149):
        tokens = runner.decode(batch)
        capacities.add(batch.keys[0].shape[2])
        for row, t in zip(got, tokens.tolist(), strict=True):
            row.append(t)
    batch.check()
    assert len(capacities) >= 3, capacities  # the buffers really grew
    assert got == want
