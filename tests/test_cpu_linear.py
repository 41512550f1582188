"""Linear layers on oneDNN with packed weights (server/cpu_linear.py): same results as torch's default kernel,
and a fall-back wherever the packed kernel cannot serve."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.cpu_linear import (
    freed_dense_layers,
    onednn_available,
    restore_linear,
    stock_linear,
    use_onednn_linear,
)
from server.fused_projections import fused_modules, stacked_linear
from tests.tiny_models import onednn_switched, running_linears, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def test_every_float32_linear_is_switched_and_computes_the_same() -> None:
    model = tiny_llama(seed=3)
    ids = torch.randint(3, 256, (3, 11))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    assert use_onednn_linear(model) == len(_linears(model)) == 15  # 7 per layer x 2 layers + the lm_head
    assert onednn_switched(model) == _linears(model)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_switching_twice_keeps_the_packed_weights() -> None:
    model = tiny_llama(seed=2)
    assert use_onednn_linear(model) == 15
    packed = [m._prefix_serve_onednn_weight for m in onednn_switched(model)]
    assert use_onednn_linear(model) == 15  # a runner built on a loaded model switches it again: a no-op
    assert [m._prefix_serve_onednn_weight for m in onednn_switched(model)] == packed


def test_a_runner_switches_its_model_unless_told_not_to() -> None:
    from server.runner import ModelRunner

    stock, fast = tiny_llama(seed=2), tiny_llama(seed=2)
    ModelRunner(stock, 2, 2, 16, onednn_linear=False)
    ModelRunner(fast, 2, 2, 16)
    assert onednn_switched(stock) == [] and _linears(stock) == running_linears(stock)
    # q/k/v and gate/up run as stacked projections there (server/fused_projections.py): those are switched.
    assert onednn_switched(fast) == running_linears(fast) and len(running_linears(fast)) == 9


def test_a_row_gets_the_same_bits_alone_as_in_a_batch() -> None:
    # The engine's batch invariance rests on this: a row's output must not depend on the rows beside it.
    layer = nn.Linear(576, 1536)
    use_onednn_linear(layer)
    x = torch.randn(32, 576)
    with torch.inference_mode():
        batched = layer(x)
        for i in (0, 7, 31):
            assert torch.equal(layer(x[i : i + 1]), batched[i : i + 1])


def test_a_weight_changed_in_place_or_replaced_is_packed_again() -> None:
    layer = nn.Linear(64, 32)
    use_onednn_linear(layer)
    x = torch.randn(5, 64)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight = nn.Parameter(torch.randn(32, 64))
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_autograd_falls_back_to_the_default_kernel() -> None:
    # Training a prefix back-propagates through the frozen layers: the gradient must be the stock one.
    model = tiny_llama(seed=4)
    model.requires_grad_(False)
    embeds = torch.randn(2, 6, 64)

    def input_grad() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        model(inputs_embeds=x).logits.square().mean().backward()
        assert x.grad is not None
        return x.grad

    want = input_grad()
    use_onednn_linear(model)
    torch.testing.assert_close(input_grad(), want)


def test_other_dtypes_are_left_alone() -> None:
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    assert use_onednn_linear(layer) == 0 and not onednn_switched(layer)


def test_a_deep_copy_packs_its_own_weights() -> None:
    model = tiny_llama(seed=5)
    use_onednn_linear(model)
    twin = copy.deepcopy(model)  # PEFT oracles in the tests wrap copies of the served model
    with torch.no_grad():
        twin.lm_head.weight.add_(0.5)  # the copy's weights are its own
    ids = torch.randint(3, 256, (1, 7))
    with torch.inference_mode():
        logits, twin_logits = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert not torch.allclose(logits, twin_logits)
    restore_linear(twin)
    with torch.inference_mode():
        torch.testing.assert_close(twin(input_ids=ids).logits, twin_logits, rtol=1e-5, atol=1e-5)


def test_stock_linear_switches_back_for_a_while() -> None:
    model = tiny_llama(seed=6)
    use_onednn_linear(model)
    with stock_linear(model):
        assert onednn_switched(model) == []
    assert onednn_switched(model) == _linears(model)
    restore_linear(model)
    with stock_linear(model):  # a model that was never switched stays stock afterwards
        pass
    assert onednn_switched(model) == []


def test_the_default_model_generates_the_same_tokens_on_either_kernel(default_model) -> None:
    model, tokenizer = default_model.model, default_model.tokenizer
    use_onednn_linear(model)  # as the server's runner does (the session's model may be switched already)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids

    def greedy() -> list[int]:
        out, tokens = ids, []
        with torch.inference_mode():
            for _ in range(12):  # the model's forward without a cache: the PEFT-style oracle loop
                token = int(model(input_ids=out).logits[0, -1].argmax())
                tokens.append(token)
                out = torch.cat([out, torch.tensor([[token]])], dim=1)
        return tokens

    fast = greedy()
    with stock_linear(model):
        stock = greedy()
    assert fast == stock


@pytest.mark.parametrize("free_dense", [False, True])
def test_a_failed_packing_switches_nothing(monkeypatch: pytest.MonkeyPatch, free_dense: bool) -> None:
    from server import cpu_linear

    packed = cpu_linear.PackedWeight.current
    calls = []

    def fail_third(self, dense: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("no reorder for this weight")
        return packed(self, dense)

    monkeypatch.setattr(cpu_linear.PackedWeight, "current", fail_third)
    model = tiny_llama(seed=8)
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert use_onednn_linear(model, free_dense=free_dense) == 0
    assert onednn_switched(model) == [] and cpu_linear.switched_layers(model) == []
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())  # the freed ones are back
    restore_linear(model)  # nothing to undo, and no error


def _held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters that have storage (meta placeholders have none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def test_freeing_the_dense_weights_leaves_the_packed_ones_the_only_copy() -> None:
    model, twin = tiny_llama(seed=4), tiny_llama(seed=4)
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 256, (2, 9))
    use_onednn_linear(twin)
    held = _held_bytes(model)
    assert use_onednn_linear(model, free_dense=True) == 15
    assert freed_dense_layers(model) == _linears(model)  # nothing ties this model's lm_head
    assert all(
        m.weight.device.type == "meta" and m.weight.shape == (m.out_features, m.in_features) for m in _linears(model)
    )
    assert held - _held_bytes(model) == sum(m.weight.numel() * 4 for m in _linears(model))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    restore_linear(model)  # the dense weights come back bit for bit
    assert onednn_switched(model) == [] and all(torch.equal(p, dense[n]) for n, p in model.named_parameters())


def test_a_tied_weight_keeps_its_dense_form() -> None:
    model = tiny_gpt2(seed=1)  # its lm_head shares the token embedding's weight, which the embedding reads
    assert model.lm_head.weight is model.transformer.wte.weight
    assert use_onednn_linear(model, free_dense=True) == 1
    assert freed_dense_layers(model) == [] and model.lm_head.weight.device.type == "cpu"
    ids = torch.randint(3, 256, (1, 6))
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    restore_linear(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, got, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_of_a_freed_model_packs_its_own_only_copies() -> None:
    model = tiny_llama(seed=5)
    use_onednn_linear(model, free_dense=True)
    twin = copy.deepcopy(model)  # PEFT oracles in the tests wrap copies of the served model
    assert len(freed_dense_layers(twin)) == 15
    ids = torch.randint(3, 256, (1, 7))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert torch.equal(twin(input_ids=ids).logits, logits)
    restore_linear(twin)
    with torch.no_grad():
        twin.lm_head.weight.add_(0.5)  # the copy's weights are its own
    with torch.inference_mode():
        assert not torch.allclose(twin(input_ids=ids).logits, logits)
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_a_call_the_packed_kernel_cannot_serve_gets_the_dense_weight_back() -> None:
    layer = nn.Linear(32, 16)
    want_weight = layer.weight.detach().clone()
    use_onednn_linear(layer, free_dense=True)
    assert freed_dense_layers(layer) == [layer]
    x = torch.randn(3, 32, requires_grad=True)  # autograd: F.linear on the dense weight
    layer(x).sum().backward()
    assert freed_dense_layers(layer) == [] and torch.equal(layer.weight, want_weight)
    torch.testing.assert_close(x.grad, want_weight.sum(0).expand(3, 32))
    with torch.inference_mode():  # still switched, on the dense weight it now keeps
        torch.testing.assert_close(layer(x.detach()), F.linear(x.detach(), want_weight, layer.bias))


def test_stock_linear_frees_again_afterwards() -> None:
    model = tiny_llama(seed=6)
    use_onednn_linear(model, free_dense=True)
    with stock_linear(model):
        assert onednn_switched(model) == [] and all(m.weight.device.type == "cpu" for m in _linears(model))
    assert freed_dense_layers(model) == _linears(model)


def test_a_runner_frees_the_dense_weights() -> None:
    from server.runner import ModelRunner

    model = tiny_llama(seed=2)
    runner = ModelRunner(model, 2, 2, 16)
    stacked = [stacked_linear(m) for m in fused_modules(model)]
    assert freed_dense_layers(model) + [s for s in stacked if freed_dense_layers(s)] == running_linears(model)
    assert (runner.device.type, runner.dtype) == ("cpu", torch.float32)


def test_a_freed_model_saves_and_loads_its_dense_weights() -> None:
    model, other = tiny_llama(seed=7), tiny_llama(seed=8)
    dense = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ids = torch.randint(3, 256, (1, 7))
    use_onednn_linear(model, free_dense=True)
    saved = model.state_dict()
    assert saved.keys() == dense.keys() and all(torch.equal(saved[k], dense[k]) for k in dense)
    with stock_linear(model):  # freed again afterwards, without a second set of hooks
        pass
    assert len(freed_dense_layers(model)) == 15 and len(model.lm_head._state_dict_hooks) == 1
    model.load_state_dict(other.state_dict())  # into dense weights, packed again on their next call
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
