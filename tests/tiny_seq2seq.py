"""Tiny random encoder-decoder models (BART, T5), PEFT seq2seq prefixes and their uncached oracle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedModel, T5Config, T5ForConditionalGeneration

VOCAB = 256
PAD, BOS, EOS = 1, 0, 2


def tiny_bart(
    seed: int = 0,
    vocab_size: int = VOCAB,
    pad: int = PAD,
    bos: int = BOS,
    eos: int = EOS,
    encoder_layers: int = 3,
    decoder_layers: int = 3,
) -> PreTrainedModel:
    """BART: learned absolute positions (offset 2) in encoder and decoder, 3 layers each (by default), 4 heads of 8.

    Scaled embeddings and a unit-variance decoder position table make greedy tokens depend on the prompt and on
    the position (at the default init a tiny BART repeats one token), so a wrong position changes the output.
    """
    torch.manual_seed(seed)
    config = BartConfig(
        init_std=0.1,
        scale_embedding=True,
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        decoder_start_token_id=eos,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
    )
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.decoder.embed_positions.weight.normal_(0.0, 1.0)
    return model


def tiny_t5(seed: int = 0, vocab_size: int = VOCAB) -> PreTrainedModel:
    """T5: relative position buckets, no absolute positions; 2 layers each side, 4 heads of 8."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        initializer_factor=3.0,  # at 1.0 a tiny T5 repeats one token whatever the prompt
    )
    return T5ForConditionalGeneration(config).eval()


def peft_seq2seq_prefix_model(base: PreTrainedModel, num_virtual_tokens: int, seed: int) -> PeftModel:
    """A PEFT seq2seq prefix-tuning model (num_transformer_submodules 2) with random prefix values."""
    config = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(base, config)
    assert peft_model.peft_config["default"].num_transformer_submodules == 2
    torch.manual_seed(seed)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0.0, 1.0)
    return peft_model.eval()


@torch.inference_mode()
def oracle_greedy_seq2seq(
    model: PreTrainedModel, prompt: list[int], decoder_start: int | Sequence[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits from full, uncached forwards (never generate(), which drops prefixes).

    ``decoder_start``: the decoder's first token, or its first tokens (the start token and a forced BOS)."""
    encoder_ids = torch.tensor([prompt])
    decoded = [decoder_start] if isinstance(decoder_start, int) else list(decoder_start)
    tokens, logits = [], []
    for _ in range(steps):
        out = model(
            input_ids=encoder_ids,
            attention_mask=torch.ones_like(encoder_ids),
            decoder_input_ids=torch.tensor([decoded]),
            decoder_attention_mask=torch.ones(1, len(decoded), dtype=torch.int64),
        )
        last = out.logits[0, -1].float()
        tokens.append(int(last.argmax()))
        logits.append(last)
        decoded.append(tokens[-1])
    return tokens, logits
