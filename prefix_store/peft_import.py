"""Import PEFT `PREFIX_TUNING` checkpoints into the native layout.

`adapter_model.safetensors` holds one tensor `prompt_embeddings`
[P, 2 * L * H_kv * d] (PEFT 0.21 writes exactly that name; with
`prefix_projection=True` it already holds the MLP's output). Viewed as
[P, 2L, H_kv, d], layer l's K is slot 2l and V slot 2l+1. For GQA models
PEFT writes `num_attention_heads = H_kv` and `token_dim = H_kv * d`.
Encoder-decoder checkpoints (`num_transformer_submodules: 2`) have the same
tensor; only the decoder's self-attention uses it, in a slot order of PEFT's
own (see ``decoder_slot_order``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prefix_store.errors import InvalidPrefix
from prefix_store.safetensors_io import read_header, tensor_from_blob

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDINGS_NAME = "prompt_embeddings"


def _parse_config(config_json: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(config_json, dict):
        return config_json
    try:
        config = json.loads(config_json)
    except (ValueError, RecursionError) as e:
        raise InvalidPrefix(f"{CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InvalidPrefix(f"{CONFIG_NAME} must be a JSON object")
    return config


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidPrefix(f"{CONFIG_NAME}: {key} must be a positive integer, got {value!r}")
    return value


def _embeddings_entry_name(names: list[str]) -> str:
    # PEFT writes the bare name; accept a module-path prefix too ("base_model.prompt_embeddings").
    matches = [n for n in names if n == EMBEDDINGS_NAME or n.endswith("." + EMBEDDINGS_NAME)]
    if len(matches) != 1:
        raise InvalidPrefix(f"{WEIGHTS_NAME} must hold one tensor {EMBEDDINGS_NAME!r}, found {sorted(names)[:6]}")
    if others := sorted(set(names) - set(matches)):
        # Weights trained beside the prefix (PEFT's modules_to_save: a head, an embedding) change the model
        # itself; served with the prefix alone, the output would differ from the checkpoint's from the first token.
        raise InvalidPrefix(
            f"{WEIGHTS_NAME} holds tensors besides {EMBEDDINGS_NAME!r} ({', '.join(others[:6])}): weights trained"
            " with the prefix change the shared model, which a prefix cannot carry; train the prefix alone"
        )
    return matches[0]


def _refuse_trained_modules(config: dict[str, Any]) -> None:
    """PEFT's modules_to_save trains and saves copies of model modules beside the prefix: not servable here."""
    modules = config.get("modules_to_save")
    if modules:
        raise InvalidPrefix(
            f"{CONFIG_NAME}: modules_to_save is {modules!r}: weights trained with the prefix change the shared"
            " model, which a prefix cannot carry; train the prefix alone"
        )


def key_values_from_peft(
    config_json: bytes | str | dict[str, Any],
    weights: bytes,
    *,
    encoder_decoder: bool | None = None,
    decoder_layers: int | None = None,
) -> torch.Tensor:
    """key_values [L, 2, H_kv, P, d] from a PEFT prefix-tuning checkpoint's two files, in the checkpoint's dtype.

    With `encoder_decoder` (the serving model's kind), a checkpoint for the other kind is refused: PEFT lays an
    encoder-decoder's slots out in another order, so the tensors would fit and every layer but the first would
    get another layer's K/V. An encoder-decoder checkpoint has one pair of slots per *encoder* layer (PEFT sizes
    it by ``num_layers``, the encoder's depth); with `decoder_layers` (the serving model's decoder depth, which
    may be smaller: distilled summarisers keep 12 encoder layers and 6 decoder ones) L is that depth.
    """
    config = _parse_config(config_json)
    peft_type = config.get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise InvalidPrefix(f"not a prefix-tuning checkpoint: peft_type is {peft_type!r}, want 'PREFIX_TUNING'")
    _refuse_trained_modules(config)
    submodules = config.get("num_transformer_submodules")
    if submodules is None:  # as PEFT fills it in when it loads the checkpoint: from the task type
        submodules = 2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
    if submodules not in (1, 2):
        raise InvalidPrefix(f"{CONFIG_NAME}: num_transformer_submodules must be 1 or 2, got {submodules!r}")
    if encoder_decoder is not None and (submodules == 2) != encoder_decoder:
        made_for, serving = (
            ("an encoder-decoder", "decoder-only") if submodules == 2 else ("a decoder-only", "an encoder-decoder")
        )
        raise InvalidPrefix(
            f"{CONFIG_NAME}: num_transformer_submodules {submodules} (task_type {config.get('task_type')!r}) is "
            f"a checkpoint for {made_for} model; this server's model is {serving}"
        )
    L = _positive_int(config, "num_layers")
    H = _positive_int(config, "num_attention_heads")  # = H_kv for GQA models
    token_dim = _positive_int(config, "token_dim")  # = H_kv * d
    P = _positive_int(config, "num_virtual_tokens")
    if token_dim % H:
        raise InvalidPrefix(f"{CONFIG_NAME}: token_dim {token_dim} is not a multiple of num_attention_heads {H}")
    d = token_dim // H

    header = read_header(weights)
    entry = header.tensors[_embeddings_entry_name(list(header.tensors))]
    expected = (P, 2 * L * token_dim)
    if entry.shape != expected:
        raise InvalidPrefix(
            f"{EMBEDDINGS_NAME} has shape {list(entry.shape)}, but {CONFIG_NAME} implies {list(expected)} "
            f"(num_virtual_tokens, 2 * num_layers * token_dim)"
        )
    emb = tensor_from_blob(weights, entry)  # [P, 2L*H*d], as saved (bf16 stays bf16: half the bytes stored)
    slots = emb.view(P, 2 * L, H, d).permute(1, 2, 0, 3)  # [2L, H, P, d]
    if submodules == 2:
        decoder_depth = L if decoder_layers is None else decoder_layers
        if decoder_depth > L:
            raise InvalidPrefix(
                f"{CONFIG_NAME}: num_layers {L} (the encoder's depth, by which PEFT sizes the prefix) gives "
                f"{decoder_depth} decoder layers too few slots"
            )
        slots = slots[decoder_slot_order(L, decoder_depth)]
        L = decoder_depth
    # [2L, H, P, d] -> [L, 2, H, P, d]; slot 2l = K_l, 2l+1 = V_l.
    return slots.reshape(L, 2, H, P, d).contiguous()


def decoder_slot_order(num_layers: int, decoder_layers: int | None = None) -> list[int]:
    """For an encoder-decoder checkpoint of ``num_layers`` slot pairs (the encoder's depth): the slots that PEFT's
    forward puts in each of the ``decoder_layers`` (default: as many) decoder layers' self-attention.

    PEFT 0.21.2 duplicates the 2L slots (for self- and cross-attention), concatenates the copies and hands
    decoder layer l the group [4l, 4l + 4) of that list: self-attention K, V, cross-attention K, V. It then
    discards the cross-attention part (it resets that cache so the encoder output is attended to). So layer l's
    self-attention K is slot 4l mod 2L and its V the slot after it: for L = 3, layers take slots (0, 1), (4, 5),
    (2, 3). A shallower decoder takes the first groups. Verified against PEFT's forward by tests/test_seq2seq.py.
    """
    order: list[int] = []
    for layer in range(num_layers if decoder_layers is None else decoder_layers):
        key_slot = (4 * layer) % (2 * num_layers)
        order += [key_slot, key_slot + 1]
    return order


def key_values_from_peft_dir(path: str | Path) -> torch.Tensor:
    """Like key_values_from_peft, reading `adapter_config.json` and `adapter_model.safetensors` from a dir."""
    root = Path(path)
    files = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            files[name] = (root / name).read_bytes()
        except FileNotFoundError:
            raise InvalidPrefix(f"{root} is not a PEFT checkpoint: {name} is missing") from None
        except OSError as e:
            raise InvalidPrefix(f"cannot read {root / name}: {e}") from None
    return key_values_from_peft(files[CONFIG_NAME], files[WEIGHTS_NAME])
