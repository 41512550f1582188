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
