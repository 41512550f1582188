"""A strict safetensors reader for untrusted bytes.

The reader never raises anything but InvalidPrefix on malformed input (the
Rust loader can raise assorted errors, or panic, on hostile headers), never
unpickles, and can read the metadata without touching tensor data.
Layout: 8-byte little-endian header length N, N bytes of JSON header, data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prefix_store.errors import InvalidPrefix

# Headers of real prefix files are a few KiB; anything huge is hostile.
MAX_HEADER_BYTES = 16 * 2**20
# Bound on data offsets when only a header is at hand.
MAX_DATA_BYTES = 2**40
# No dimension of a stored tensor comes near this; beyond it, a zero-size tensor (whose byte count matches any
# other dimension) could declare a shape that overflows the allocation of the stack it is copied into.
MAX_DIMENSION = 2**31 - 1

DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets into the blob
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _parse_entry(name: str, raw: object, data_len: int, data_start: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise InvalidPrefix(f"tensor {name!r}: header entry must be an object")
    dtype_name, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype_name not in DTYPES:
        raise InvalidPrefix(f"tensor {name!r}: unsupported dtype {dtype_name!r} (want one of {list(DTYPES)})")
    dtype = DTYPES[str(dtype_name)]
    # `type(x) is int`, not isinstance: JSON gives exact ints, and a bool (an int subclass) is refused with it.
    # This runs for every tensor of every header a listing reads (60 per prefix of the default model).
    if type(shape) is not list or not all(type(s) is int for s in shape):
        raise InvalidPrefix(f"tensor {name!r}: shape must be a list of integers")
    if shape and min(shape) < 0:
        raise InvalidPrefix(f"tensor {name!r}: negative dimension in shape {shape}")
    if shape and max(shape) > MAX_DIMENSION:
        raise InvalidPrefix(f"tensor {name!r}: dimension above {MAX_DIMENSION} in shape {shape}")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise InvalidPrefix(f"tensor {name!r}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InvalidPrefix(f"tensor {name!r}: data_offsets {offsets} outside the data ({data_len} bytes)")
    itemsize = dtype.itemsize  # not torch.empty(...).element_size(): this runs per tensor on every listing
    if math.prod(shape) * itemsize != end - begin:
        raise InvalidPrefix(f"tensor {name!r}: shape {shape} does not match its {end - begin} data bytes")
    return TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(blob: bytes, *, allow_truncated_data: bool = False) -> Header:
    """Parse and check the header of a safetensors blob (no tensor data is read).

    With `allow_truncated_data`, `blob` may stop after the header: data
    offsets are then checked for consistency but not against the blob's end.
    """
    if len(blob) < 8:
        raise InvalidPrefix("not a safetensors file: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES:
        raise InvalidPrefix(f"not a safetensors file: header length {n} is implausible{_looks_like(blob)}")
    if 8 + n > len(blob):
        raise InvalidPrefix("not a safetensors file: truncated header")
    try:
        raw = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidPrefix(f"not a safetensors file: header is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InvalidPrefix("not a safetensors file: header must be a JSON object")
    meta_raw = raw.pop("__metadata__", {})
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise InvalidPrefix("safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = MAX_DATA_BYTES if allow_truncated_data else len(blob) - data_start
    tensors = {name: _parse_entry(name, entry, data_len, data_start) for name, entry in raw.items()}
    _check_layout(tensors, data_start, None if allow_truncated_data else len(blob))
    return Header(tensors=tensors, metadata=dict(meta_raw))


def _check_layout(tensors: dict[str, TensorEntry], data_start: int, data_end: int | None) -> None:
    """The tensors' bytes follow each other with no overlap and no hole, to the end of the data (the safetensors
    format's rule, which its own loader enforces: no two tensors read the same bytes, no bytes hide between)."""
    at = data_start
    for entry in tensors.values():  # the usual case: listed in the order of their bytes (safetensors writes so)
        if entry.start != at:
            break
        at = entry.end
    else:
        if data_end is None or at == data_end:
            return
    at = data_start
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != at:
            what = "overlaps the tensor before it" if entry.start < at else "leaves unindexed bytes before it"
            raise InvalidPrefix(f"tensor {name!r}: data_offsets {what} (not a valid safetensors layout)")
        at = entry.end
    if data_end is not None and at != data_end:
        raise InvalidPrefix(f"{data_end - at} bytes after the last tensor (not a valid safetensors layout)")


def _looks_like(blob: bytes) -> str:
    """A hint for a file that is not safetensors, from its first bytes."""
    if blob.startswith(b"PK\x03\x04"):
        return (
            " (it is a zip archive: a torch.save .bin or an archived directory; upload the .safetensors file, or a"
            " PEFT checkpoint's adapter_config.json and adapter_model.safetensors as multipart)"
        )
    if blob.lstrip()[:1] in (b"{", b"["):
        return " (it is JSON: a PEFT checkpoint's adapter_config.json goes with its weights, as multipart)"
    return ""


def tensor_from_blob(blob: bytes, entry: TensorEntry) -> torch.Tensor:
    """Copy one tensor's bytes out of the blob (little-endian, as safetensors stores)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    copy_from_blob(blob, entry, out)
    return out


def copy_from_blob(blob: bytes, entry: TensorEntry, out: torch.Tensor) -> None:
    """Copy one tensor's bytes from the blob into ``out`` (contiguous, CPU, of the entry's dtype and size).

    One memcpy, through numpy views of both sides: no intermediate ``bytes`` slice, and no torch op, so it
    never starts a torch thread pool on the calling (I/O) thread.
    """
    size = entry.end - entry.start
    if size:
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(blob, dtype=np.uint8, count=size, offset=entry.start)


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidPrefix(f"{what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidPrefix(f"{what} must be a JSON object")
    return obj
