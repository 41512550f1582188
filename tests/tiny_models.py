"""Tiny random models and PEFT prefixes shared by the tests (no downloads)."""

from __future__ import annotations

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

VOCAB = 256


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB) -> PreTrainedModel:
    """Llama with grouped-query attention: 4 query heads share 2 KV heads of size 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = VOCAB) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def peft_prefix_model(base: PreTrainedModel, num_virtual_tokens: int, seed: int) -> PeftModel:
    """A PEFT prefix-tuning model with random prefix values (as if trained)."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(base, config)
    torch.manual_seed(seed)
    embedding = peft_model.prompt_encoder["default"].embedding
    with torch.no_grad():
        embedding.weight.normal_(0.0, 1.0)
    return peft_model.eval()


def prefix_kv_of(peft_model: PeftModel) -> torch.Tensor:
    """The PEFT prefix as [L, 2, H_kv, P, d], read straight from the prompt encoder's weight."""
    cfg = peft_model.peft_config["default"]
    weight = peft_model.prompt_encoder["default"].embedding.weight.detach()  # [P, 2 * L * H * d]
    p, layers, heads = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
    head_dim = cfg.token_dim // heads
    kv = weight.view(p, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)  # [2L, H, P, d]
    return kv.reshape(layers, 2, heads, p, head_dim).clone()


@torch.inference_mode()
def oracle_greedy(model: PreTrainedModel, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits from full, uncached forwards (PEFT's training path).

    Never PEFT's generate(): on this stack it silently drops the prefix.
    """
    ids = list(prompt)
    tokens, logits = [], []
    for _ in range(steps):
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
        last = out.logits[0, -1].float()
        token = int(last.argmax())
        tokens.append(token)
        logits.append(last)
        ids.append(token)
    return tokens, logits


def running_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers a forward runs: the model's own, except those fused into stacked projections
    (server/fused_projections.py), whose stacked layers run instead (after the model's own, in module order)."""
    from server.cpu_linear import FUSED_MEMBER
    from server.fused_projections import fused_modules, stacked_linear

    own = [m for m in model.modules() if type(m) is torch.nn.Linear and not getattr(m, FUSED_MEMBER, False)]
    return own + [stacked_linear(m) for m in fused_modules(model)]


def onednn_switched(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Linear layers whose forward server/cpu_linear.py replaced, read off the layers (fused members and stacked
    projections included), not off its own bookkeeping."""
    from server.fused_projections import fused_modules, stacked_linear

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layers += [stacked_linear(m) for m in fused_modules(model)]
    return [m for m in layers if "forward" in m.__dict__]
