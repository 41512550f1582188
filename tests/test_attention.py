"""server/attention.py: GQA on the KV heads equals stock attention, never repeats K/V, and is what the server runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.integrations import sdpa_attention

from server.attention import ATTENTION_NAME, gqa_attention_forward, use_gqa_attention
from server.model_loading import LoadedModel
from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams


class _Module(torch.nn.Module):
    """What an attention function reads off its module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with K/V repeated per query head: [B, q, H_q, d]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # [B, H_q, q, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def _padded_causal_mask(real: torch.Tensor, q_len: int) -> torch.Tensor:
    """Bool [B, 1, q, T]: query i (the last q columns) sees real columns up to its own."""
    width = real.shape[1]
    causal = torch.arange(width)[None, :] <= torch.arange(width - q_len, width)[:, None]  # [q, T]
    return (causal[None] & real[:, None, :].bool())[:, None]


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("q_len", [1, 5])
def test_function_equals_repeated_heads_reference(heads: int, kv_heads: int, q_len: int) -> None:
    g = torch.Generator().manual_seed(0)
    batch, width, head_dim = 3, 11, 8
    query = torch.randn(batch, heads, q_len, head_dim, generator=g)
    # K/V as strided views of larger buffers, as the runner's in-place cache hands them over.
    key = torch.randn(batch, kv_heads, width + 4, head_dim, generator=g)[:, :, :width]
    value = torch.randn(batch, kv_heads, width + 4, head_dim, generator=g)[:, :, :width]
    real = torch.ones(batch, width, dtype=torch.int64)
    real[0, :4] = 0  # left padding
    real[2, 2:5] = 0  # a gap between prefix and prompt
    mask = _padded_causal_mask(real, q_len)
    want = _reference(query, key, value, mask)
    got, _ = gqa_attention_forward(_Module(heads // kv_heads), query, key, value, mask, scaling=head_dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)  # sliding-window models' 4-D float masks
    got, _ = gqa_attention_forward(_Module(heads // kv_heads), query, key, value, additive, scaling=head_dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _tiny_llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_model_logits_equal_stock_sdpa_with_padding_and_a_prefix_cache(kv_heads: int) -> None:
    stock = _tiny_llama(kv_heads)
    ours = copy.deepcopy(stock)
    assert use_gqa_attention(ours) and stock.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(1)
    batch, past, prompt = 3, 4, 6
    # A prefix-like cache: 4 columns of K/V per layer, masked off in row 1 (a row without prefix).
    past_kv = [torch.randn(2, batch, kv_heads, past, 16, generator=g) for _ in range(2)]
    mask = torch.ones(batch, past + prompt, dtype=torch.int64)
    mask[1, :past] = 0
    mask[2, past : past + 2] = 0  # a shorter prompt, left-padded after its prefix
    ids = torch.randint(0, 128, (batch, prompt), generator=g)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]

    def run(model: LlamaForCausalLM) -> list[torch.Tensor]:
        cache = DynamicCache()
        for layer, kv in enumerate(past_kv):
            cache.update(kv[0].clone(), kv[1].clone(), layer)
        logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits]
        step_mask, step_pos, token = mask, positions[:, -1:], logits[0][:, -1:].argmax(-1)
        for _ in range(3):  # q = 1 decode steps
            step_mask = torch.cat([step_mask, torch.ones(batch, 1, dtype=torch.int64)], 1)
            step_pos = step_pos + 1
            out = model(input_ids=token, attention_mask=step_mask, position_ids=step_pos, cache=cache)
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
        return logits

    with torch.inference_mode():
        want, got = run(stock), run(ours)
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)


def test_no_repeated_kv_heads_on_any_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill with padding (q > 1, a mask) and decode (q = 1) both run without transformers' repeat_kv."""

    def forbidden(*args: object) -> None:
        raise AssertionError("repeat_kv materialised repeated KV heads")

    model = _tiny_llama(2)
    runner = ModelRunner(model, 2, 2, 16)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", forbidden)
    params = SamplingParams(max_new_tokens=4)
    batch, _ = runner.prefill([NewRequest("a", [5, 6, 7, 8, 9], params), NewRequest("b", [10, 11], params)])
    runner.decode(batch)
    model.config._attn_implementation = "sdpa"  # the stock path does repeat them: the guard works
    with pytest.raises(AssertionError, match="repeat_kv"):
        runner.prefill([NewRequest("a", [5, 6, 7, 8, 9], params), NewRequest("b", [10, 11], params)])


def test_the_runner_forwards_through_the_registered_function(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_llama(2)
    runner = ModelRunner(model, 2, 2, 16)
    assert model.config._attn_implementation == ATTENTION_NAME
    calls: list[tuple[int, ...]] = []

    def spy(module: torch.nn.Module, query: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tuple(query.shape))
        return gqa_attention_forward(module, query, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION_NAME, spy)
    params = SamplingParams(max_new_tokens=4)
    batch, _ = runner.prefill([NewRequest("a", [5, 6, 7], params), NewRequest("b", [9], params)])
    runner.decode(batch)
    assert calls == [(2, 4, 3, 16)] * 2 + [(2, 4, 1, 16)] * 2  # two layers, prefill then one decode step


def test_the_default_model_is_served_with_it(default_model: LoadedModel) -> None:
    assert default_model.model.config._attn_implementation == ATTENTION_NAME
    assert AttentionInterface._global_mapping[ATTENTION_NAME] is gqa_attention_forward


def test_only_verified_gqa_decoders_switch() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    assert not use_gqa_attention(gpt2)  # MHA: nothing to gain, stock attention stays
    assert gpt2.config._attn_implementation != ATTENTION_NAME
    eager = _tiny_llama(2)
    eager.set_attn_implementation("eager")
    assert not use_gqa_attention(eager)  # someone asked for eager: leave it
