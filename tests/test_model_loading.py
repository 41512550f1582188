"""Model sources, device/dtype choice, and what the loader reads off a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.model_loading import (
    DEFAULT_GGUF_FILE,
    ModelLoadError,
    default_model_source,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve_model_source,
)


def test_sources(tmp_path: Path, tiny_model_dir: Path) -> None:
    default = default_model_source()
    assert default.gguf_file == DEFAULT_GGUF_FILE and default.name == "SmolLM2-135M-Instruct"
    assert resolve_model_source(None) == default
    gguf = Path(default.path) / DEFAULT_GGUF_FILE
    assert resolve_model_source(str(gguf)).gguf_file == DEFAULT_GGUF_FILE
    assert resolve_model_source(str(tiny_model_dir)).gguf_file is None
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_uncached_hub_id_fails_clearly_offline() -> None:
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("no-such-org/no-such-model-xyz")


def test_dtype_defaults_and_errors() -> None:
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))


def test_local_directory_is_frozen_and_described(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.model.training is False
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim) == (2, 2, 16)
    assert loaded.fingerprint.architecture == "llama" and loaded.max_context == 512
    assert loaded.eos_token_ids == [2]
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template


def test_the_loader_leaves_linear_layers_as_shipped(tiny_model_dir: Path) -> None:
    # The runner picks its kernels (server/cpu_linear.py); training and other users of load_model get stock layers.
    from tests.tiny_models import onednn_switched

    assert onednn_switched(load_model(str(tiny_model_dir), device="cpu").model) == []


def test_gguf_path_resolves_like_the_default(default_model) -> None:
    # The default model is loaded from a .gguf file; a path to that file resolves to the same source.
    gguf = Path(default_model_source().path) / DEFAULT_GGUF_FILE
    assert resolve_model_source(str(gguf)).path == default_model_source().path
    assert default_model.name == "SmolLM2-135M-Instruct" and default_model.max_context == 8192


def test_a_tokenizer_loads_without_its_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the S3 harness uses when it runs no in-process baseline: the model's own tokenizer, nothing else."""
    text = "Prefix tuning keeps the model frozen."
    want = load_model(str(tiny_model_dir), device="cpu").tokenizer(text).input_ids
    assert load_tokenizer(str(tiny_model_dir))(text).input_ids == want
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def _gguf(
    path: Path, *, block_count: int | None = 2, rope_scaling: str | None = None, rope_freqs: bool = False
) -> Path:
    """A small GGUF file with the fields and tensors the checks before loading read (not a whole model)."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    if block_count is not None:
        writer.add_block_count(block_count)
    if rope_scaling is not None:
        writer.add_string("llama.rope.scaling.type", rope_scaling)
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files_transformers_would_load_wrong_are_refused(tmp_path: Path) -> None:
    """transformers' GGUF loader gives a file without block_count its config's default depth (32 Llama layers, 30
    of them random) and drops RoPE scaling: refused, by name, before any weight is read."""
    from server.gguf_files import check_gguf_file

    assert check_gguf_file(_gguf(tmp_path / "plain.gguf")) == "smollm"
    assert check_gguf_file(_gguf(tmp_path / "none.gguf", rope_scaling="none")) == "smollm"
    with pytest.raises(ValueError, match=r"how many layers it has \(llama.block_count\)"):
        check_gguf_file(_gguf(tmp_path / "depth.gguf", block_count=None))
    for name, kwargs in (("linear.gguf", {"rope_scaling": "linear"}), ("llama3.gguf", {"rope_freqs": True})):
        path = _gguf(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ModelLoadError, match="scales its RoPE positions"):
            load_model(str(path), device="cpu")
    whole = (Path(default_model_source().path) / DEFAULT_GGUF_FILE).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:2000])  # cut inside its metadata: a struct.error traceback before
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "cut.gguf"), device="cpu")


def test_a_model_missing_weights_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers initialises missing weights at random and serves on: refused, naming them."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 of its weights \(model.layers.1.mlp.down_proj.weight\)"):
        load_model(str(broken), device="cpu")


def test_the_default_tokenizer_splits_as_smollm2s_does() -> None:
    """The GGUF says tokenizer.ggml.pre 'smollm', which transformers does not know (it fell back to GPT-2's
    split): each digit apart first, then GPT-2's byte-level split, as llama.cpp and SmolLM2's own tokenizer do."""
    tokenizer = load_tokenizer(None)
    pieces = {
        text: tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids) for text in ("Steps:\n 1. mix", "x =  5")
    }
    assert pieces == {"Steps:\n 1. mix": ["Steps", ":", "ĊĠ", "1", ".", "Ġmix"], "x =  5": ["x", "Ġ=", "ĠĠ", "5"]}
    assert tokenizer.convert_ids_to_tokens(tokenizer("In 2024").input_ids) == ["In", "Ġ", "2", "0", "2", "4"]
