"""One matmul for q/k/v and one for gate/up (server/fused_projections.py): same function, no extra memory."""

from __future__ import annotations

import copy
import inspect

import torch
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from server.cpu_linear import freed_dense_layers
from server.fused_projections import fuse_projections, is_fused, stacked_linear, unfused, use_onednn_for_fused
from server.model_loading import probe_kv_shape
from server.runner import ModelRunner, NewRequest
from server.sampling import SamplingParams
from tests.test_architectures import make_model
from tests.tiny_models import oracle_greedy, peft_prefix_model, prefix_kv_of, tiny_llama


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_fused_llama_computes_the_same_logits_with_its_weights_held_once() -> None:
    model = tiny_llama(seed=3)
    stock = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers  # attention and MLP of each layer
    assert fuse_projections(model) == 0  # idempotent
    layer = model.model.layers[0]
    assert is_fused(layer.self_attn) and is_fused(layer.mlp)
    # Each original weight is a view of the stacked one: one copy in memory.
    stacked = stacked_linear(layer.self_attn).weight
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    # The state dict is the model's own: same keys, same values (what PEFT and checkpoints see).
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    ids = torch.randint(3, 250, (3, 11), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=1e-5, atol=1e-5)
    # A weight changed in place through the original layer is what the fused matmul reads.
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(0.5)
        stock.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=1e-5, atol=1e-5)


def test_qwen2_fuses_its_mlps_and_leaves_its_biased_attention_alone() -> None:
    model = make_model("qwen2-window")
    config = model.config
    with torch.no_grad():  # random biases: zeros would hide a bias that went missing
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_()
    stock = copy.deepcopy(model)
    # Qwen2's attention has its own forward (sliding windows): only the MLPs are fused there.
    assert fuse_projections(model) == config.num_hidden_layers
    assert not is_fused(model.model.layers[0].self_attn) and is_fused(model.model.layers[0].mlp)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=1e-5, atol=1e-5)


def test_a_subclass_with_its_own_forward_is_left_alone() -> None:
    class HalvedMLP(LlamaMLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 0.5

    model = tiny_llama(seed=3)
    model.model.layers[1].mlp = HalvedMLP(model.config)
    fuse_projections(model)
    assert is_fused(model.model.layers[0].mlp) and not is_fused(model.model.layers[1].mlp)


def test_a_llama_with_attention_bias_fuses_the_biases() -> None:
    model = make_model("llama", attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_()
    stock = copy.deepcopy(model)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert stacked_linear(model.model.layers[0].self_attn).bias is not None
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=1e-5, atol=1e-5)


def test_a_runner_with_fused_projections_decodes_prefixed_rows_as_the_oracle() -> None:
    """Prefill, fixed-shape decode steps and prefixes through the fused layers: PEFT's forward is the oracle."""
    base = tiny_llama(seed=5)
    served = copy.deepcopy(base)
    runner = ModelRunner(
        served, *probe_kv_shape(served), static_decode=True, onednn_linear=False, fuse_projections=True
    )
    assert is_fused(served.model.layers[0].self_attn)
    gen = torch.Generator().manual_seed(9)
    steps = 12
    oracles, requests = [], []
    for i, p in enumerate((4, 0, 2)):  # rows of unequal prefixes and prompts: padding and masks in play
        prompt = torch.randint(3, 250, (3 + 2 * i,), generator=gen).tolist()
        peft = peft_prefix_model(copy.deepcopy(base), p, seed=40 + i) if p else None
        kv = prefix_kv_of(peft) if peft is not None else None
        oracles.append(oracle_greedy(peft if peft is not None else base, prompt, steps)[0])
        requests.append(NewRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=steps), kv, f"t{i}" if p else None))
    batch, first = runner.prefill(requests)
    tokens = [[t] for t in first.tolist()]
    for _ in range(steps - 1):
        for row, token in zip(tokens, runner.decode(batch).tolist(), strict=True):
            row.append(token)
    assert tokens == oracles


def test_a_cpu_runner_fuses_on_onednn_and_holds_each_weight_once() -> None:
    """On a CPU the runner fuses q/k/v and gate/up where its linear layers run on oneDNN (float32): the stacked
    projections are packed, their packed copies the only ones (the members' weights placeholders), the logits
    those of the stock model, and the state dict the stock model's own. The Triton kernel stays a CUDA default."""
    model = tiny_llama(seed=2)
    stock = copy.deepcopy(model)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    runner = ModelRunner(model, *probe_kv_shape(model), static_decode=True)
    assert runner.static_decoder is not None and not runner.static_decoder.kernel
    fused = [m for m in model.modules() if is_fused(m)]
    assert len(fused) == 2 * model.config.num_hidden_layers
    for module in fused:
        assert freed_dense_layers(stacked_linear(module))  # the packed copy is the only one
        members = ("q_proj", "k_proj", "v_proj") if hasattr(module, "q_proj") else ("gate_proj", "up_proj")
        assert all(getattr(module, name).weight.is_meta for name in members)
    assert not any(is_fused(m) for m in stock.modules())
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=1e-4, atol=1e-5)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # A deep copy serves the same; a state dict loaded back is what the fused matmuls read.
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, ids), _logits(model, ids), rtol=0, atol=0)
    halved = {k: v * 0.5 if k.endswith("up_proj.weight") else v for k, v in expected.items()}
    model.load_state_dict(halved)
    stock.load_state_dict(halved)
    torch.testing.assert_close(_logits(model, ids), _logits(stock, ids), rtol=1e-4, atol=1e-5)


def test_unfused_runs_the_stock_forwards_then_fuses_again() -> None:
    """The bench's baseline (bench/inproc.stock_model): the model's own forwards on the member layers."""
    model = tiny_llama(seed=2)
    stock = copy.deepcopy(model)
    fuse_projections(model)
    use_onednn_for_fused(model, free_dense=True)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    want = _logits(stock, ids)
    attention = model.model.layers[0].self_attn
    with unfused(model):
        assert "forward" not in attention.__dict__
        assert not attention.q_proj.weight.is_meta  # dense again, for the stock forward to read
        torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-6)
    assert "forward" in attention.__dict__
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-5)


def test_every_listed_class_has_the_forward_the_fused_one_repeats() -> None:
    """The fused forwards repeat Llama's attention and MLP with one matmul: a listed class whose forward differs
    (a transformers release that changed it) would be served wrongly, so each must read as Llama's."""
    from server import fused_projections

    for names, reference in (
        (fused_projections._ATTENTION_CLASSES, LlamaAttention),
        (fused_projections._MLP_CLASSES, LlamaMLP),
    ):
        classes = fused_projections._classes(names)
        assert len(classes) == len(names)  # all importable with the pinned transformers
        for kind in classes:
            assert inspect.getsource(kind.forward) == inspect.getsource(reference.forward), kind.__name__
