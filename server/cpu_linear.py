"""Linear layers on oneDNN with prepacked weights, for float32 models on the CPU.

torch's CPU ``F.linear`` in float32 is MKL's sgemm, which reads the [N, K] weight as it is stored on every call.
oneDNN's inner product runs on a weight reordered once into its own blocked layout. On the 2-core AMD EPYC
(AVX-512) of our CI machines that makes a decode step of the default model 1.35-1.5x faster (batch 16: 122 ->
81 ms; batch 32: 192 -> 131 ms; batch 1: 59 -> 43 ms), most of it in the lm_head ([49152, 576]: 25 -> 10 ms at
32 rows). Results are float32 like MKL's, summed in another order (logits differ by ~1e-4 relative).

By default each switched layer keeps its dense weight and holds the packed copy beside it: the weights' memory
twice. Anything the packed kernel cannot serve, it hands to ``F.linear``: autograd (training a prefix
back-propagates through the frozen layers), another dtype or device, and tracing by torch.compile. A weight
changed in place is packed again on its next call.

A server has no use for the dense copies: ``free_dense=True`` replaces each weight that no other parameter
shares (a tied lm_head shares the embedding's, which the embedding reads) by a placeholder on the meta device,
of the same shape and dtype. The packed copy is then the only one: ~405 MiB less for the default model, ~4 GiB
for a 1B-parameter one. ``to_dense()`` of a packed weight gives the dense weight back bit for bit, so whatever
needs it gets it back: a call the packed kernel cannot serve (the weight stays dense from then on), a deep copy,
``restore_linear``, a state dict (a transient dense copy), and ``load_state_dict`` (into the dense weight, which
is then packed again on its next call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from server.heap_trim import malloc_trim

log = logging.getLogger(__name__)

# The attribute of a switched layer holding its ``PackedWeight``.
_PACKED = "_prefix_serve_onednn_weight"
# The mark of a layer whose weight is rows of a stacked projection (server/fused_projections.py): the stacked
# layer is what runs, so the member is never switched (its packed copy would only hold the weights twice).
FUSED_MEMBER = "_prefix_serve_fused_member"


class PackedWeight:
    """A layer's weight in oneDNN's layout, and the (address, version) of the dense weight it was made from.

    Copies and pickles come out empty and pack on first use: oneDNN's opaque tensors have no storage to copy
    (``copy.deepcopy`` of a switched model would fail otherwise). One that is the only copy of its weight
    (``only_copy``: the layer's dense weight was freed) is copied through its dense form and packed again.
    """

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None
        self.source: tuple[int, int] | None = None
        self.only_copy = False

    def __reduce__(self) -> tuple[Callable[..., PackedWeight], tuple[torch.Tensor, ...]]:
        if self.only_copy:
            return PackedWeight.only_copy_of, (self.dense(),)
        return PackedWeight, ()

    @classmethod
    def only_copy_of(cls, dense: torch.Tensor) -> PackedWeight:
        """A packed copy of ``dense`` [N, K] that stands alone (its layer's dense weight is a placeholder)."""
        packed = cls()
        packed.current(dense)
        packed.only_copy = True
        return packed

    def dense(self) -> torch.Tensor:
        """The dense weight [N, K], rebuilt from the packed one (exactly: oneDNN's reorder only moves values)."""
        assert self.weight is not None
        with torch.no_grad():
            return self.weight.to_dense()

    def current(self, dense: torch.Tensor) -> torch.Tensor:
        """The packed form of ``dense`` [N, K], packed again if the weight was replaced or changed in place."""
        source = (dense.data_ptr(), dense._version)
        if self.weight is None or self.source != source:
            with torch.no_grad():
                self.weight = torch.ops.mkldnn._reorder_linear_weight(dense.detach(), None)
            self.source = source
        return self.weight


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linear(model: nn.Module, *, free_dense: bool = False) -> int:
    """Switch the model's float32 CPU ``nn.Linear`` layers to packed oneDNN; returns how many are switched.
    Layers switched before are left as they are. ``free_dense``: the switched layers' dense weights that no
    other parameter or buffer of ``model`` shares are freed (the module docstring says what that means)."""
    if not onednn_available():
        return 0
    done = len(switched_layers(model))
    layers = [m for m in model.modules() if _eligible(m) and not hasattr(m, _PACKED)]
    shared = _shared_storages(model) if free_dense else set()
    switched: list[nn.Linear] = []
    try:
        # Layer by layer, each dense weight freed once its packed copy exists: the peak stays near the weights'
        # size plus one layer's (packing them all first would hold every weight twice).
        for layer in layers:
            weight = PackedWeight()
            weight.current(layer.weight)  # now, not in the first request
            setattr(layer, _PACKED, weight)
            layer.forward = MethodType(_onednn_forward, layer)  # type: ignore[method-assign]
            switched.append(layer)
            if free_dense and layer.weight.untyped_storage().data_ptr() not in shared:
                _free_dense(layer, weight)
    except RuntimeError as exc:  # a oneDNN build that cannot reorder: stay on MKL, say why
        _unswitch(switched)
        log.warning("oneDNN linear layers unavailable, using torch's default: %s", exc)
        return done
    if any(getattr(layer, _PACKED).only_copy for layer in switched):
        # The weights came from glibc's heap, which keeps freed pages resident: give them back.
        trim = malloc_trim()
        if trim is not None:
            trim()
    return done + len(layers)


def switched_layers(model: nn.Module) -> list[nn.Module]:
    """The layers ``use_onednn_linear`` switched, in module order."""
    return [layer for layer in model.modules() if hasattr(layer, _PACKED)]


def freed_dense_layers(model: nn.Module) -> list[nn.Module]:
    """The switched layers whose packed weight is the only copy."""
    return [layer for layer in switched_layers(model) if getattr(layer, _PACKED).only_copy]


def restore_linear(model: nn.Module) -> None:
    """Undo ``use_onednn_linear``: every layer back to ``nn.Linear.forward`` with its dense weight, packed copies
    freed."""
    _unswitch(switched_layers(model))


def _unswitch(layers: list[nn.Module]) -> None:
    for layer in layers:
        _dense_weight(layer)
        del layer.forward
        delattr(layer, _PACKED)


@contextmanager
def stock_linear(model: nn.Module) -> Iterator[None]:
    """Run the model's linear layers on torch's default kernel for a while (a baseline), then switch back."""
    switched, freed = bool(switched_layers(model)), bool(freed_dense_layers(model))
    restore_linear(model)
    try:
        yield
    finally:
        if switched:
            use_onednn_linear(model, free_dense=freed)


def _shared_storages(model: nn.Module) -> set[int]:
    """Storages that two or more of the model's parameters and buffers use (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=False)]
    for tensor in tensors:
        address = tensor.untyped_storage().data_ptr()
        (shared if address in seen else seen).add(address)
    return shared


# The attribute marking a layer whose state-dict hooks are registered (once: switching again must not add more).
_HOOKED = "_prefix_serve_state_dict_hooks"


def _free_dense(layer: nn.Linear, packed: PackedWeight) -> None:
    """Leave ``packed`` the only copy of the layer's weight: the Parameter becomes a meta placeholder [N, K]."""
    weight = layer.weight
    layer.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=weight.requires_grad)
    packed.only_copy = True
    if not getattr(layer, _HOOKED, False):
        layer.register_state_dict_post_hook(_dense_in_state_dict)
        layer.register_load_state_dict_pre_hook(_dense_before_load)
        setattr(layer, _HOOKED, True)


def _dense_in_state_dict(layer: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, _: object) -> None:
    """A state dict holds the dense weight [N, K] of a layer whose packed copy is the only one, not the meta
    placeholder."""
    packed = getattr(layer, _PACKED, None)
    if packed is not None and packed.only_copy:
        state_dict[prefix + "weight"] = packed.dense()


def _dense_before_load(layer: nn.Module, *_: object) -> None:
    """``load_state_dict`` copies into the Parameter: make it dense first (a meta one would take nothing)."""
    if getattr(layer, _PACKED, None) is not None:
        _dense_weight(layer)


def dense_copy(layer: nn.Linear) -> torch.Tensor:
    """The layer's dense weight [N, K]: its own, or a transient copy rebuilt from the packed one if freed."""
    packed: PackedWeight | None = getattr(layer, _PACKED, None)
    return packed.dense() if packed is not None and packed.only_copy else layer.weight


def dense_weight(layer: nn.Linear) -> torch.Tensor:
    """The layer's dense weight, rebuilt from its packed copy if freed and kept from then on."""
    return _dense_weight(layer) if hasattr(layer, _PACKED) else layer.weight


def _dense_weight(layer: nn.Linear) -> torch.Tensor:
    """The layer's dense weight, rebuilt from the packed copy if it was freed (and kept from then on)."""
    packed: PackedWeight = getattr(layer, _PACKED)
    if packed.only_copy:
        layer.weight = nn.Parameter(packed.dense(), requires_grad=layer.weight.requires_grad)
        packed.only_copy = False
        packed.source = (layer.weight.data_ptr(), layer.weight._version)
    return layer.weight


def _eligible(module: nn.Module) -> bool:
    # Exactly nn.Linear: subclasses (quantised, LoRA-wrapped, ...) have forwards of their own.
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and not getattr(module, FUSED_MEMBER, False)
    )


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` [..., K] -> [..., N] on the packed weight, or on F.linear where that cannot serve."""
    packed: PackedWeight = getattr(self, _PACKED)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
    if (
        needs_grad
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or (not packed.only_copy and (self.weight.dtype != torch.float32 or self.weight.device.type != "cpu"))
    ):
        return F.linear(x, _dense_weight(self), self.bias)
    weight = packed.weight if packed.only_copy else packed.current(self.weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
