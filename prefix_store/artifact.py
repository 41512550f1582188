"""The native prefix artifact: safetensors bytes plus metadata.

In memory a prefix is one tensor `key_values` [L, 2, H_kv, P, d]
(index 0 of dim 1 = key, 1 = value). On disk each layer's K and V is its own
tensor `layers.{l}.key` / `layers.{l}.value` [H_kv, P, d], and the
safetensors `__metadata__` (strings only) carries format, ids, version, the
sha256 of the tensor bytes and the base model's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import torch
from safetensors.torch import save

from prefix_store.errors import CorruptPrefix, InvalidPrefix, InvalidTaskId
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.ids import validate_task_id, validate_tenant
from prefix_store.safetensors_io import (
    DTYPES,
    Header,
    TensorEntry,
    copy_from_blob,
    parse_json_object,
    read_header,
)

FORMAT_NAME = "prefix-serve"
FORMAT_VERSION = 1
LAYOUT = "layers.{l}.{key,value}: [kv_heads, virtual_tokens, head_dim]"
_KV_NAMES = ("key", "value")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32"."""
    return str(dtype).removeprefix("torch.")


_DTYPE_BY_NAME = {dtype_name(dt): dt for dt in DTYPES.values()}


@dataclass(frozen=True)
class PrefixMetadata:
    task_id: str
    tenant: str
    version: int
    num_virtual_tokens: int
    dtype: str
    sha256: str
    created_at: str
    fingerprint: ModelFingerprint
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor data: L * 2 * H_kv * P * d * itemsize."""
        fp = self.fingerprint
        itemsize = torch.empty((), dtype=_DTYPE_BY_NAME[self.dtype]).element_size()
        return fp.num_layers * 2 * fp.num_kv_heads * self.num_virtual_tokens * fp.head_dim * itemsize

    def to_public_dict(self) -> dict[str, Any]:
        """The API's view (no tenant: callers only ever see their own)."""
        return {
            "task_id": self.task_id,
            "version": self.version,
            "num_virtual_tokens": self.num_virtual_tokens,
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "created_at": self.created_at,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class PrefixArtifact:
    key_values: torch.Tensor  # [L, 2, H_kv, P, d], CPU, contiguous
    metadata: PrefixMetadata


def _sha256_of(chunks: Iterable[bytes | memoryview]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # Raw little-endian bytes of a CPU tensor, in C order (view as uint8 works for bf16 too).
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def tensor_sha256(key_values: torch.Tensor) -> str:
    """sha256 of the raw bytes of layer 0 key, layer 0 value, layer 1 key, ... ([L, 2, H, P, d])."""
    return _sha256_of(_tensor_bytes(key_values[layer, kv]) for layer in range(key_values.shape[0]) for kv in (0, 1))


def _check_structure(key_values: torch.Tensor) -> None:
    if not isinstance(key_values, torch.Tensor):
        raise InvalidPrefix(f"key_values must be a tensor, got {type(key_values).__name__}")
    if key_values.dim() != 5 or key_values.shape[1] != 2:
        raise InvalidPrefix(
            f"key_values must have shape [layers, 2, kv_heads, virtual_tokens, head_dim], got {list(key_values.shape)}"
        )
    if key_values.dtype not in _DTYPE_BY_NAME.values():
        raise InvalidPrefix(
            f"key_values dtype {dtype_name(key_values.dtype)} is not supported (want one of {sorted(_DTYPE_BY_NAME)})"
        )


def _shape_differences(key_values: torch.Tensor, fingerprint: ModelFingerprint) -> list[str]:
    # Only L, H_kv and d can be read off a [L, 2, H_kv, P, d] tensor.
    L, _, H, _, d = key_values.shape
    return ModelFingerprint(fingerprint.architecture, L, H, d, fingerprint.vocab_size).differences(fingerprint)


def validate_key_values(
    key_values: torch.Tensor,
    fingerprint: ModelFingerprint,
    *,
    max_virtual_tokens: int,
    serving_dtype: torch.dtype | None = None,
) -> None:
    """Check that `key_values` [L, 2, H_kv, P, d] fits the model; InvalidPrefix otherwise.

    With `serving_dtype` (the model's), values must also stay finite once cast to it: 1e6 is a float32 but
    overflows float16, and a float64 1e300 overflows float32, into K/V that make every logit NaN.
    """
    _check_structure(key_values)
    diffs = _shape_differences(key_values, fingerprint)
    if diffs:
        raise InvalidPrefix("prefix does not fit this model: " + "; ".join(diffs))
    P = key_values.shape[3]
    if not 1 <= P <= max_virtual_tokens:
        raise InvalidPrefix(f"num_virtual_tokens must be between 1 and {max_virtual_tokens}, got {P}")
    if not bool(torch.isfinite(key_values).all()):
        raise InvalidPrefix("prefix has non-finite values (NaN or Inf)")
    cast = key_values if serving_dtype is None else key_values.to(serving_dtype)
    if not bool(torch.isfinite(cast).all()):
        raise InvalidPrefix(
            f"prefix has values out of the range of {dtype_name(cast.dtype)}, the dtype this server runs the model "
            f"in (largest magnitude {key_values.abs().max().item():.3g})"
        )


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_artifact(
    key_values: torch.Tensor,
    *,
    task_id: str,
    tenant: str,
    version: int,
    fingerprint: ModelFingerprint,
    created_at: str | None = None,
) -> bytes:
    """Serialise `key_values` [L, 2, H_kv, P, d] with its metadata to safetensors bytes."""
    _check_structure(key_values)
    validate_task_id(task_id)
    validate_tenant(tenant)
    diffs = _shape_differences(key_values, fingerprint)
    if diffs:
        raise InvalidPrefix("prefix does not fit its fingerprint: " + "; ".join(diffs))
    L, P = key_values.shape[0], key_values.shape[3]
    kv = key_values.detach().cpu()
    # clone(): safetensors refuses tensors that share storage, and slices of kv do.
    tensors = {f"layers.{layer}.{_KV_NAMES[i]}": kv[layer, i].clone() for layer in range(L) for i in (0, 1)}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "task_id": task_id,
        "tenant": tenant,
        "version": str(version),
        "num_virtual_tokens": str(P),
        "dtype": dtype_name(kv.dtype),
        "sha256": tensor_sha256(kv),
        "created_at": created_at or utc_now_iso(),
        "fingerprint": json.dumps(fingerprint.to_dict(), sort_keys=True),
        "layout": LAYOUT,
    }
    return save(tensors, metadata=metadata)


_LAYER_NAME = re.compile(r"layers\.(\d{1,6})\.(?:key|value)")


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _explain_layer_names(names: set[str]) -> NoReturn:
    """Why tensor names are not a prefix's: the layers are counted up to the highest named (so a missing tensor
    is named as missing), or the file is a PEFT checkpoint's weights sent alone."""
    if any(n == "prompt_embeddings" or n.endswith(".prompt_embeddings") for n in names):
        raise InvalidPrefix(
            "this is a PEFT checkpoint's adapter_model.safetensors: upload it with its adapter_config.json "
            "(the checkpoint directory, or both files as multipart)"
        )
    indices = [int(m[1]) for m in map(_LAYER_NAME.fullmatch, names) if m is not None]
    num_layers = max(indices) + 1 if indices else 0
    if num_layers > len(names):  # e.g. only "layers.99999.key": not worth listing what is missing
        raise InvalidPrefix(f"tensor layers.{num_layers - 1} is named, but there are only {len(names)} tensors")
    expected = {f"layers.{layer}.{kv}" for layer in range(num_layers) for kv in _KV_NAMES}
    missing, extra = sorted(expected - names), sorted(names - expected)
    raise InvalidPrefix(
        f"expected tensors layers.0..{max(num_layers - 1, 0)}.{{key,value}}"
        + (f"; missing {_few(missing)}" if missing else "")
        + (f"; unexpected {_few(extra)}" if extra else "")
    )


def layer_entries(header: Header) -> list[tuple[TensorEntry, TensorEntry]]:
    """The (key, value) entries per layer, checking names and shapes are consistent."""
    names = set(header.tensors)
    num_layers = len(names) // 2
    expected = {f"layers.{layer}.{kv}" for layer in range(num_layers) for kv in _KV_NAMES}
    if num_layers == 0 or names != expected:
        _explain_layer_names(names)
    pairs = [
        (header.tensors[f"layers.{layer}.key"], header.tensors[f"layers.{layer}.value"]) for layer in range(num_layers)
    ]
    first = pairs[0][0]
    if len(first.shape) != 3:
        raise InvalidPrefix(f"layers.0.key must be [kv_heads, virtual_tokens, head_dim], got {list(first.shape)}")
    for layer, pair in enumerate(pairs):
        for kv, entry in zip(_KV_NAMES, pair, strict=True):
            if entry.shape != first.shape or entry.dtype != first.dtype:
                raise InvalidPrefix(
                    f"layers.{layer}.{kv} is {dtype_name(entry.dtype)}{list(entry.shape)}, "
                    f"expected {dtype_name(first.dtype)}{list(first.shape)} like layers.0.key"
                )
    return pairs


def _stack(blob: bytes, pairs: list[tuple[TensorEntry, TensorEntry]]) -> torch.Tensor:
    """The pairs' tensors as one [L, 2, H_kv, P, d], each copied once from the blob into its place."""
    first = pairs[0][0]
    out = torch.empty((len(pairs), 2, *first.shape), dtype=first.dtype)
    for layer, pair in enumerate(pairs):
        for kv, entry in enumerate(pair):
            copy_from_blob(blob, entry, out[layer, kv])
    return out


def _blob_sha256(blob: bytes, pairs: list[tuple[TensorEntry, TensorEntry]]) -> str:
    view = memoryview(blob)
    return _sha256_of(view[e.start : e.end] for pair in pairs for e in pair)


def _int_field(meta: dict[str, str], key: str, minimum: int) -> int:
    raw = meta.get(key)
    if raw is None:
        raise InvalidPrefix(f"metadata is missing {key!r}")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidPrefix(f"metadata {key} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise InvalidPrefix(f"metadata {key} must be >= {minimum}, got {value}")
    return value


def _check_format(meta: dict[str, str], *, required: bool) -> None:
    fmt = meta.get("format")
    if fmt is None and not required:
        return
    if fmt != FORMAT_NAME:
        raise InvalidPrefix(f"not a {FORMAT_NAME} prefix (format is {fmt!r})")
    if "format_version" in meta or required:
        version = _int_field(meta, "format_version", 1)
        if version != FORMAT_VERSION:
            raise InvalidPrefix(f"unsupported format_version {version} (this server reads {FORMAT_VERSION})")


def metadata_from_header(header: Header, pairs: list[tuple[TensorEntry, TensorEntry]]) -> PrefixMetadata:
    meta = header.metadata
    _check_format(meta, required=True)
    H, P, d = pairs[0][0].shape
    num_virtual_tokens = _int_field(meta, "num_virtual_tokens", 1)
    if num_virtual_tokens != P:
        raise InvalidPrefix(f"metadata num_virtual_tokens {num_virtual_tokens} but tensors hold {P}")
    dtype = dtype_name(pairs[0][0].dtype)
    if meta.get("dtype") != dtype:
        raise InvalidPrefix(f"metadata dtype {meta.get('dtype')!r} but tensors are {dtype}")
    fingerprint = ModelFingerprint.from_dict(parse_json_object(meta.get("fingerprint", ""), "metadata fingerprint"))
    found = ModelFingerprint(fingerprint.architecture, len(pairs), H, d, fingerprint.vocab_size)
    if found != fingerprint:
        raise InvalidPrefix(
            "tensors disagree with the stored fingerprint: " + "; ".join(found.differences(fingerprint))
        )
    sha = meta.get("sha256", "")
    if len(sha) != 64:
        raise InvalidPrefix("metadata sha256 is missing or malformed")
    for key in ("task_id", "tenant", "created_at"):
        if key not in meta:
            raise InvalidPrefix(f"metadata is missing {key!r}")
    try:
        task_id, tenant = validate_task_id(meta["task_id"]), validate_tenant(meta["tenant"])
    except InvalidTaskId as e:  # inside a blob it is a malformed artifact
        raise InvalidPrefix(f"metadata: {e}") from None
    return PrefixMetadata(
        task_id=task_id,
        tenant=tenant,
        version=_int_field(meta, "version", 1),
        num_virtual_tokens=P,
        dtype=dtype,
        sha256=sha,
        created_at=meta["created_at"],
        fingerprint=fingerprint,
        format_version=FORMAT_VERSION,
    )


def read_metadata(blob: bytes) -> PrefixMetadata:
    """Metadata of a native artifact from its header alone; no tensor data is read or verified.

    `blob` may be the whole artifact or just its first 8 + header-length bytes.
    """
    header = read_header(blob, allow_truncated_data=True)
    return metadata_from_header(header, layer_entries(header))


def decode_artifact(blob: bytes) -> PrefixArtifact:
    """Decode and verify a stored artifact.

    CorruptPrefix if the tensor bytes do not match the recorded sha256;
    InvalidPrefix for anything malformed. Never raises anything else.
    """
    header = read_header(blob)
    pairs = layer_entries(header)
    metadata = metadata_from_header(header, pairs)
    actual = _blob_sha256(blob, pairs)
    if actual != metadata.sha256:
        raise CorruptPrefix(
            f"prefix {metadata.tenant}/{metadata.task_id} v{metadata.version} failed its checksum "
            f"(recorded {metadata.sha256[:12]}…, actual {actual[:12]}…)"
        )
    return PrefixArtifact(key_values=_stack(blob, pairs), metadata=metadata)


def parse_uploaded_native(blob: bytes, model: ModelFingerprint | None = None) -> torch.Tensor:
    """key_values [L, 2, H_kv, P, d] of an uploaded native file.

    The uploader's task id, tenant and version are ignored; `format` (if
    present) must be ours and `sha256` (if present) must match the tensors;
    a `fingerprint` (if present) must be `model`'s: the prefix was made for it.
    A bare safetensors file with just the `layers.{l}.{key,value}` tensors is accepted.
    """
    header = read_header(blob)
    pairs = layer_entries(header)
    _check_format(header.metadata, required=False)
    declared = header.metadata.get("fingerprint")
    if declared is not None and model is not None:
        made_for = ModelFingerprint.from_dict(parse_json_object(declared, "metadata fingerprint"))
        if diffs := made_for.differences(model):
            raise InvalidPrefix("prefix was made for another model: " + "; ".join(diffs))
    sha = header.metadata.get("sha256")
    if sha is not None and sha != _blob_sha256(blob, pairs):
        raise InvalidPrefix("uploaded prefix does not match its own sha256 (damaged in transit?)")
    return _stack(blob, pairs)
