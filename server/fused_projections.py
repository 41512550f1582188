"""One matmul for q/k/v and one for gate/up, in Llama-style layers.

A decode step at batch 64 multiplies a [64, h] activation by each weight of a layer. The K and V projections of
a 1B Llama ([512, 2048] each, 2 MB in bf16) are too small to reach the GPU's memory bandwidth: on an H100 each
took ~5.4 µs where their bytes need 0.7 (bench/RESULTS.md, seventh session). Stacking the weights that read the
same input turns seven matmuls a layer into four:

    [W_q; W_k; W_v]    [(H_q + 2·H_kv)·d, h]   -> q, k, v by splitting the output's last axis (views, no copy)
    [W_gate; W_up]     [2·I, h]                -> gate, up likewise; down(act(gate) · up) as before

Each output column is the same dot product as before, summed in the library's order for the new shape, so
results match the separate matmuls up to float rounding (exactly in spirit, not bit for bit).

The stacked weight is the only copy: each original ``nn.Linear`` keeps a weight that is a view of its rows (rows
of a row-major matrix are contiguous), so anything that calls the layers one by one (prefill through stock code,
a state dict, PEFT) reads the same memory. Replacing a parameter afterwards (``model.to(dtype)``, a new
``nn.Parameter``) would cut that tie; the runner does this once, after the model is on its device, and the
engine never does either.

Only instances of exactly the listed classes are touched (a subclass may change the forward): attention classes
whose forward is Llama's and MLPs whose forward is Llama's MLP's (tests/test_fused_projections.py compares the
sources); the per-instance forwards below repeat those with the fused matmul. Weights that are placeholders (the
CPU's oneDNN layers freed their dense copies, server/cpu_linear.py) are left as they are.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import MethodType, ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# (module, class) of attention layers with Llama's forward: q/k/v/o projections, rotary, the attention interface.
_ATTENTION_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    ("transformers.models.gemma.modeling_gemma", "GemmaAttention"),
)
# (module, class) of MLPs computing down(act(gate(x)) · up(x)).
_MLP_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaMLP"),
    ("transformers.models.mistral.modeling_mistral", "MistralMLP"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2MLP"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3MLP"),
    ("transformers.models.gemma.modeling_gemma", "GemmaMLP"),
)

# Instance attributes holding a fused layer's stacked weight [N, h], its bias [N] or None, and the split sizes.
_WEIGHT, _BIAS, _SPLIT = "_prefix_serve_fused_weight", "_prefix_serve_fused_bias", "_prefix_serve_fused_split"


def _classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    found = []
    for module_name, class_name in names:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # an older or newer transformers without it: nothing to fuse there
            continue
    return tuple(found)


def _stack(module: nn.Module, linears: list[nn.Linear]) -> bool:
    """Stack ``linears``' weights (and biases) into one tensor held by ``module``; each layer keeps a view."""
    if len({lin.bias is None for lin in linears}) != 1:
        return False
    weights = [lin.weight for lin in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or any(w.is_meta for w in weights):
        return False
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])  # [sum N_i, h]
        bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    sizes = [w.shape[0] for w in weights]
    start = 0
    for lin, size in zip(linears, sizes, strict=True):
        requires_grad = lin.weight.requires_grad
        lin.weight = nn.Parameter(weight[start : start + size], requires_grad=requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + size], requires_grad=requires_grad)
        start += size
    setattr(module, _WEIGHT, weight)
    setattr(module, _BIAS, bias)
    setattr(module, _SPLIT, sizes)
    return True


def _fused(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = F.linear(x, getattr(module, _WEIGHT), getattr(module, _BIAS))  # [..., sum N_i]
    return out.split(getattr(module, _SPLIT), dim=-1)


def _attention_forward_of(modeling: ModuleType) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The forward of a fused attention layer of ``modeling`` (its own rotary and attention functions, bound
    here rather than looked up per call, so that torch.compile traces plain closures)."""
    rotary, functions, eager = (
        modeling.apply_rotary_pos_emb,
        modeling.ALL_ATTENTION_FUNCTIONS,
        modeling.eager_attention_forward,
    )

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,  # [B, q, h]
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Llama attention with q/k/v from one matmul; otherwise the stock forward, step for step."""
        if cache is None:  # transformers before 5.24 passed the cache under its old name
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = _fused(self, hidden_states)
        query_states = query.view(hidden_shape).transpose(1, 2)  # [B, H_q, q, d]
        key_states = key.view(hidden_shape).transpose(1, 2)  # [B, H_kv, q, d]
        value_states = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = rotary(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        interface = functions.get_interface(self.config._attn_implementation, eager)
        attn_output, attn_weights = interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    return forward


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = _fused(self, x)  # [..., I] each
    return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up in every layer where the forward is known; returns how many modules it fused.
    Idempotent: a fused module is skipped."""
    attention_classes, mlp_classes = _classes(_ATTENTION_CLASSES), _classes(_MLP_CLASSES)
    fused = 0
    for module in model.modules():
        if hasattr(module, _WEIGHT):
            continue
        kind = type(module)  # exactly these classes: a subclass may change the forward
        if kind in attention_classes and _stack(module, [module.q_proj, module.k_proj, module.v_proj]):
            module.forward = MethodType(_attention_forward_of(sys.modules[kind.__module__]), module)
            fused += 1
        elif kind in mlp_classes and _stack(module, [module.gate_proj, module.up_proj]):
            module.forward = MethodType(_mlp_forward, module)
            fused += 1
    return fused


def is_fused(module: nn.Module) -> bool:
    return hasattr(module, _WEIGHT)
