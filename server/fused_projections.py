"""One matmul for q/k/v and one for gate/up, in Llama-style layers.

A decode step at batch 64 multiplies a [64, h] activation by each weight of a layer. The K and V projections of
a 1B Llama ([512, 2048] each, 2 MB in bf16) are too small to reach the GPU's memory bandwidth: on an H100 each
took ~5.4 µs where their bytes need 0.7 (bench/RESULTS.md, seventh session). Stacking the weights that read the
same input turns seven matmuls a layer into four:

    [W_q; W_k; W_v]    [(H_q + 2·H_kv)·d, h]   -> q, k, v by splitting the output's last axis (views, no copy)
    [W_gate; W_up]     [2·I, h]                -> gate, up likewise; down(act(gate) · up) as before

On an H100 that took 26% off a compiled decode step; on the CPU, with the stacked layers on packed oneDNN
weights, 2-9% off the default model's (bench/RESULTS.md, fourteenth session).

Each output column is the same dot product as before, summed in the library's order for the new shape, so
results match the separate matmuls up to float rounding (exactly in spirit, not bit for bit).

The stacked projection is an ``nn.Linear`` held by the attention or MLP module outside its module tree, so the
model's parameters and state dict stay its own: each member layer (q_proj, ...) keeps a weight that is a view of
its rows of the stacked weight (rows of a row-major matrix are contiguous). On a CPU the stacked layers run on
packed oneDNN weights (server/cpu_linear.py); when the packed copy becomes the only one, the members' weights
become placeholders too, and the module gives state dicts the members' dense rows (rebuilt from the packed copy)
and takes loaded weights back. Replacing a parameter afterwards (``model.to(dtype)``, a new ``nn.Parameter``)
would cut the tie; the runner fuses once, after the model is on its device, and the engine never does either.

Only instances of exactly the listed classes are touched (a subclass may change the forward): attention classes
whose forward is Llama's and MLPs whose forward is Llama's MLP's (tests/test_fused_projections.py compares the
sources); the per-instance forwards below repeat those with the fused matmul. Weights that are already
placeholders (oneDNN freed their dense copies before any fusing) are left as they are. ``unfused`` runs the
stock forwards for a while (a benchmark's baseline).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MethodType, ModuleType
from typing import Any

import torch
from torch import nn

from server.cpu_linear import FUSED_MEMBER, dense_copy, dense_weight, freed_dense_layers, use_onednn_linear

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

# Instance attributes of a fused module: its stacked projection (an ``nn.Linear`` [h -> sum N_i] kept out of the
# module tree, so that parameters and state dicts stay the model's own), the split sizes, and the names of the
# layers it stands for. A member layer is marked too (the CPU's oneDNN switch leaves members alone).
_LINEAR, _SPLIT, _MEMBERS = "_prefix_serve_fused_linear", "_prefix_serve_fused_split", "_prefix_serve_fused_members"
# Set on a fused module whose members' weights are placeholders behind the stacked layer's packed copy, and on
# one whose state-dict hooks are registered (once).
_RELEASED, _HOOKED = "_prefix_serve_fused_released", "_prefix_serve_fused_hooks"


def _classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    found = []
    for module_name, class_name in names:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # an older or newer transformers without it: nothing to fuse there
            continue
    return tuple(found)


def _stack(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Stack the named layers' weights (and biases) into one ``nn.Linear`` held by ``module``; each layer keeps
    views of its rows."""
    linears: list[nn.Linear] = [getattr(module, name) for name in names]
    if len({lin.bias is None for lin in linears}) != 1:
        return False
    weights = [lin.weight for lin in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or any(w.is_meta for w in weights):
        return False
    requires_grad = weights[0].requires_grad
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])  # [sum N_i, h]
        bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    stacked.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        stacked.bias = nn.Parameter(bias, requires_grad=requires_grad)
    sizes = [w.shape[0] for w in weights]
    _point_members_at(linears, stacked.weight, stacked.bias, sizes)
    for lin in linears:
        setattr(lin, FUSED_MEMBER, True)
    object.__setattr__(module, _LINEAR, stacked)  # not a submodule: invisible to modules() and state_dict()
    setattr(module, _SPLIT, sizes)
    setattr(module, _MEMBERS, names)
    return True


def _point_members_at(
    linears: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]
) -> None:
    """Give each member layer views of its rows of the stacked ``weight`` [sum N_i, h] and ``bias``."""
    start = 0
    for lin, size in zip(linears, sizes, strict=True):
        requires_grad = lin.weight.requires_grad
        lin.weight = nn.Parameter(weight.detach()[start : start + size], requires_grad=requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach()[start : start + size], requires_grad=requires_grad)
        start += size


def _fused(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = getattr(module, _LINEAR)(x)  # [..., sum N_i]: nn.Linear, or packed oneDNN on a CPU (cpu_linear.py)
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
        if is_fused(module):
            continue
        kind = type(module)  # exactly these classes: a subclass may change the forward
        if kind in attention_classes and _stack(module, ("q_proj", "k_proj", "v_proj")):
            module.forward = MethodType(_attention_forward_of(sys.modules[kind.__module__]), module)
            fused += 1
        elif kind in mlp_classes and _stack(module, ("gate_proj", "up_proj")):
            module.forward = MethodType(_mlp_forward, module)
            fused += 1
    return fused


def is_fused(module: nn.Module) -> bool:
    return hasattr(module, _LINEAR)


def fused_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if is_fused(module)]


def stacked_linear(module: nn.Module) -> nn.Linear:
    """A fused module's stacked projection [h -> sum N_i]."""
    return getattr(module, _LINEAR)


def use_onednn_for_fused(model: nn.Module, *, free_dense: bool) -> None:
    """On a CPU, the stacked projections on packed oneDNN weights (server/cpu_linear.py). With ``free_dense`` the
    packed copy becomes the only one: the members' weights turn into placeholders too (their views would keep
    the dense rows alive), and the fused module gives state dicts its members' dense weights from the packed
    copy and takes loaded ones back (hooks registered once)."""
    modules = fused_modules(model)
    # One call for all: one pass, one trim of the heap afterwards (a call per layer took 0.3 s more at startup).
    use_onednn_linear(nn.ModuleList([stacked_linear(module) for module in modules]), free_dense=free_dense)
    for module in modules:
        if not free_dense or not freed_dense_layers(stacked_linear(module)) or getattr(module, _RELEASED, False):
            continue
        for name in getattr(module, _MEMBERS):
            member = getattr(module, name)
            placeholder = torch.empty_like(member.weight, device="meta")
            member.weight = nn.Parameter(placeholder, requires_grad=member.weight.requires_grad)
        if not hasattr(module, _HOOKED):
            module.register_state_dict_post_hook(_members_in_state_dict)
            module.register_load_state_dict_pre_hook(_members_before_load)
            setattr(module, _HOOKED, True)
        setattr(module, _RELEASED, True)


def _members_in_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, _: object) -> None:
    """Members whose weights are placeholders: their dense rows, sliced from the packed copy (a transient)."""
    if not getattr(module, _RELEASED, False):
        return
    dense = dense_copy(stacked_linear(module))  # [sum N_i, h]
    start = 0
    for name, size in zip(getattr(module, _MEMBERS), getattr(module, _SPLIT), strict=True):
        state_dict[f"{prefix}{name}.weight"] = dense[start : start + size]
        start += size


def _members_before_load(module: nn.Module, *_: object) -> None:
    """Before ``load_state_dict`` copies into the members: dense again, as views of the stacked weight (which is
    then dense for good), so what is loaded is what the fused matmul reads."""
    restore_members(module)


def restore_members(module: nn.Module) -> None:
    """Members' weights as views of the stacked layer's dense weight (rebuilt from its packed copy if freed)."""
    if not getattr(module, _RELEASED, False):
        return
    stacked = stacked_linear(module)
    weight = dense_weight(stacked)
    members = [getattr(module, name) for name in getattr(module, _MEMBERS)]
    _point_members_at(members, weight, None, getattr(module, _SPLIT))
    setattr(module, _RELEASED, False)


@contextmanager
def unfused(model: nn.Module) -> Iterator[None]:
    """Run the model's stock forwards for a while (a baseline), reading the member layers; then fused again. The
    members' dense weights stay afterwards (beside a packed copy on a CPU): for benchmarks, not for serving."""
    modules = fused_modules(model)
    forwards = [module.__dict__.pop("forward") for module in modules]  # the class's own forward again
    for module in modules:
        restore_members(module)
    try:
        yield
    finally:
        for module, forward in zip(modules, forwards, strict=True):
            module.forward = forward
