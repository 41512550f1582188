"""What transformers' GGUF loader does not check, checked before and after it reads a ``.gguf`` file.

transformers (5.24) turns a GGUF file into a model and a tokenizer, and some files into the wrong ones, silently:

- a missing ``{arch}.block_count`` becomes the config's default (32 layers for Llama): the layers the file does not
  have are freshly initialised (so is any missing tensor: ``load_model`` refuses missing weights for every source);
- RoPE scaling (``{arch}.rope.scaling.type``, or llama.cpp's ``rope_freqs`` tensor for Llama 3's) is dropped: the
  model runs with unscaled positions;
- a ``tokenizer.ggml.pre`` it has no entry for falls back to GPT-2's pre-tokenizer. For ``smollm`` (the embedded
  default model's) that splits whitespace before a digit apart ("\\n 1" as "Ċ", "Ġ", "1" where SmolLM2's tokenizer,
  and llama.cpp's, give "ĊĠ", "1").

The checks raise ValueError, which model loading reports as a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader
from transformers import PreTrainedTokenizerBase

# Pre-tokenizers transformers' GGUF loader does not know, as llama.cpp defines them (llama-vocab.cpp): each digit
# split off first, then GPT-2's byte-level split of the rest. (llama.cpp gives starcoder, refact, command-r and a
# few more the same one; only smollm is checked here.)
_DIGITS_THEN_BYTE_LEVEL = frozenset({"smollm"})


def check_gguf_file(path: str | Path) -> str | None:
    """Refuse a file transformers would load into the wrong model (ValueError saying why); else its tokenizer's
    pre-tokenizer name (``tokenizer.ggml.pre``), if it names one."""
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # numpy/struct errors on a truncated or malformed header
        raise ValueError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from exc

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path} does not say its architecture (general.architecture)")
    if value(f"{arch}.block_count") is None:
        raise ValueError(f"{path} does not say how many layers it has ({arch}.block_count)")
    scaling = value(f"{arch}.rope.scaling.type")
    if (scaling is not None and scaling != "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            f"{path} scales its RoPE positions ({arch}.rope.scaling.type {scaling!r}, or a rope_freqs tensor), which "
            "transformers' GGUF loader drops: the model would run unscaled. Serve the model's Hugging Face "
            "directory instead"
        )
    pre = value("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) else None


def fix_pre_tokenizer(tokenizer: PreTrainedTokenizerBase, pre: str | None) -> None:
    """Give ``tokenizer`` (loaded from a GGUF file whose ``tokenizer.ggml.pre`` is ``pre``) the pre-tokenizer its
    model was trained with, where transformers fell back to GPT-2's."""
    if pre not in _DIGITS_THEN_BYTE_LEVEL or not getattr(tokenizer, "is_fast", False):
        return
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
