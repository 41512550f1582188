import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from prefix_store.artifact import decode_artifact, encode_artifact, validate_key_values
from prefix_store.errors import InvalidPrefix
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.peft_import import key_values_from_peft, key_values_from_peft_dir
from prefix_store.safetensors_io import read_header

# transformers warns about its own deprecated helper while PEFT wraps the model.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

NUM_VIRTUAL_TOKENS = 5


def tiny_gpt2() -> PreTrainedModel:
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_llama_gqa() -> PreTrainedModel:
    # 4 query heads sharing 2 KV heads: PEFT must write num_attention_heads = 2.
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg)


def fingerprint_of(model: PreTrainedModel) -> ModelFingerprint:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return ModelFingerprint(cfg.model_type, cfg.num_hidden_layers, kv_heads, cfg.hidden_size // heads, cfg.vocab_size)


def prompt_layers(model: PeftModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's own prefix per layer as (K, V), each [H_kv, P, d]."""
    model.eval()
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)
    # transformers 5.x: a DynamicCache whose .layers[l] has .keys/.values [1, H_kv, P, d].
    if hasattr(prompt, "layers"):
        return [(layer.keys[0], layer.values[0]) for layer in prompt.layers]
    return [(k[0], v[0]) for k, v in prompt]  # legacy tuple-of-tuples


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], tuple[Path, PeftModel]]:
    cache: dict[tuple[str, bool], tuple[Path, PeftModel]] = {}

    def build(kind: str, projection: bool) -> tuple[Path, PeftModel]:
        if (kind, projection) not in cache:
            torch.manual_seed(0)
            base = {"gpt2": tiny_gpt2, "llama": tiny_llama_gqa}[kind]()
            config = PrefixTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                prefix_projection=projection,
                encoder_hidden_size=32,
            )
            model = get_peft_model(base, config)
            if projection:
                # Randomise the MLP so its output differs clearly from its input.
                with torch.no_grad():
                    for p in model.prompt_encoder.parameters():
                        p.normal_()
            out = tmp_path_factory.mktemp(f"{kind}-{projection}")
            model.save_pretrained(out)
            cache[kind, projection] = (out, model)
        return cache[kind, projection]

    return build


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True])
def test_import_equals_get_prompt(saved, kind: str, projection: bool) -> None:  # type: ignore[no-untyped-def]
    path, model = saved(kind, projection)
    kv = key_values_from_peft_dir(path)  # [L, 2, H_kv, P, d]
    expected = prompt_layers(model)
    fp = fingerprint_of(model.base_model)
    assert kv.dtype == torch.float32
    assert kv.shape == (fp.num_layers, 2, fp.num_kv_heads, NUM_VIRTUAL_TOKENS, fp.head_dim)
    assert len(expected) == fp.num_layers
    for layer, (k, v) in enumerate(expected):
        torch.testing.assert_close(kv[layer, 0], k, rtol=0, atol=0)
        torch.testing.assert_close(kv[layer, 1], v, rtol=0, atol=0)
    # Layers differ from each other, so a swapped slot would have been caught.
    assert not torch.equal(kv[0, 0], kv[0, 1]) and not torch.equal(kv[0, 0], kv[1, 0])
    validate_key_values(kv, fp, max_virtual_tokens=NUM_VIRTUAL_TOKENS)
    blob = encode_artifact(kv, task_id="t", tenant="default", version=1, fingerprint=fp)
    assert torch.equal(decode_artifact(blob).key_values, kv)


def test_checkpoint_format_is_what_we_expect(saved) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved("llama", False)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (3, 2, 32)
    assert config["num_transformer_submodules"] == 1
    weights = load_file(path / "adapter_model.safetensors")
    assert list(weights) == ["prompt_embeddings"]
    assert weights["prompt_embeddings"].shape == (NUM_VIRTUAL_TOKENS, 2 * 3 * 32)


def _files(path: Path) -> tuple[dict, bytes]:
    return json.loads((path / "adapter_config.json").read_text()), (path / "adapter_model.safetensors").read_bytes()


def test_accepts_bytes_config_and_prefixed_tensor_name(saved) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved("gpt2", False)
    config, weights = _files(path)
    reference = key_values_from_peft(config, weights)
    assert torch.equal(key_values_from_peft(json.dumps(config).encode(), weights), reference)
    renamed = save({"base_model.prompt_embeddings": load_file(path / "adapter_model.safetensors")["prompt_embeddings"]})
    assert torch.equal(key_values_from_peft(config, renamed), reference)


def test_a_checkpoint_for_the_other_kind_of_model_is_refused(saved) -> None:  # type: ignore[no-untyped-def]
    """An encoder-decoder checkpoint's tensor fits a decoder-only model of the same shape, in another slot order
    (every layer but the first would get another layer's K/V): refused, and the other way round."""
    path, _ = saved("llama", False)
    config, weights = _files(path)
    assert key_values_from_peft(config, weights, encoder_decoder=False).shape[0] == 3
    seq2seq = {**config, "num_transformer_submodules": 2, "task_type": "SEQ_2_SEQ_LM"}
    with pytest.raises(InvalidPrefix, match="for an encoder-decoder model; this server's model is decoder-only"):
        key_values_from_peft(seq2seq, weights, encoder_decoder=False)
    with pytest.raises(InvalidPrefix, match="for a decoder-only model; this server's model is an encoder-decoder"):
        key_values_from_peft(config, weights, encoder_decoder=True)
    # Without num_transformer_submodules, PEFT takes it from the task type: 2 for SEQ_2_SEQ_LM, else 1.
    unset = {k: v for k, v in seq2seq.items() if k != "num_transformer_submodules"}
    assert torch.equal(
        key_values_from_peft(unset, weights, encoder_decoder=True),
        key_values_from_peft(seq2seq, weights, encoder_decoder=True),
    )
    # A decoder deeper than the encoder PEFT sized the prefix by has layers without slots.
    with pytest.raises(InvalidPrefix, match="too few slots"):
        key_values_from_peft(seq2seq, weights, encoder_decoder=True, decoder_layers=4)
    causal = {k: v for k, v in config.items() if k != "num_transformer_submodules"}
    assert torch.equal(
        key_values_from_peft(causal, weights, encoder_decoder=False), key_values_from_peft(config, weights)
    )


def test_the_checkpoints_dtype_is_kept(saved) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved("llama", False)
    config, weights = _files(path)
    as_bf16 = {n: t.to(torch.bfloat16) for n, t in load_file(path / "adapter_model.safetensors").items()}
    got = key_values_from_peft(config, save(as_bf16))
    assert got.dtype == torch.bfloat16  # stored as uploaded: half float32's bytes
    assert torch.equal(got, key_values_from_peft(config, weights).to(torch.bfloat16))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "LORA"}, "peft_type is 'LORA'"),
        ({"num_transformer_submodules": 3}, "must be 1 or 2"),
        ({"num_layers": 3}, "implies"),
        ({"num_virtual_tokens": 6}, "implies"),
        ({"token_dim": 30}, "not a multiple"),
        ({"num_layers": "2"}, "positive integer"),
        ({"num_virtual_tokens": 0}, "positive integer"),
    ],
)
def test_bad_configs_rejected(saved, change: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved("gpt2", False)
    config, weights = _files(path)
    with pytest.raises(InvalidPrefix, match=message):
        key_values_from_peft({**config, **change}, weights)


def test_bad_files_rejected(saved, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved("gpt2", False)
    config, weights = _files(path)
    for bad_json in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(InvalidPrefix):
            key_values_from_peft(bad_json, weights)
    for bad_weights in (b"", b"garbage!" * 10, weights[: len(weights) // 2], save({"other": torch.zeros(1)})):
        with pytest.raises(InvalidPrefix):
            key_values_from_peft(config, bad_weights)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidPrefix, match=r"adapter_model\.safetensors is missing"):
        key_values_from_peft_dir(tmp_path)


def test_weights_trained_beside_the_prefix_are_refused(tmp_path: Path) -> None:
    """PEFT's modules_to_save trains a copy of a module (here the LM head) with the prefix and saves it beside
    prompt_embeddings; its forward uses that copy. Served with the prefix alone, the output differed from the first
    token, so such a checkpoint is refused, by its config and by its tensors."""
    torch.manual_seed(0)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, modules_to_save=["lm_head"]
    )
    model = get_peft_model(tiny_llama_gqa(), config)
    model.save_pretrained(tmp_path)
    with pytest.raises(InvalidPrefix, match=r"modules_to_save is \['lm_head'\]"):
        key_values_from_peft_dir(tmp_path)
    saved_config, weights = _files(tmp_path)
    assert any("lm_head" in name for name in read_header(weights).tensors)  # what PEFT wrote beside the prefix
    with pytest.raises(InvalidPrefix, match=r"holds tensors besides 'prompt_embeddings' \(.*lm_head"):
        key_values_from_peft({**saved_config, "modules_to_save": None}, weights)
