import contextlib
import hashlib
import json
import random
import struct

import pytest
import torch
from safetensors.torch import load, save

from prefix_store.artifact import (
    PrefixMetadata,
    decode_artifact,
    encode_artifact,
    parse_uploaded_native,
    read_metadata,
    tensor_sha256,
    validate_key_values,
)
from prefix_store.errors import CorruptPrefix, InvalidPrefix, InvalidTaskId
from prefix_store.fingerprint import ModelFingerprint

FP = ModelFingerprint("llama", num_layers=3, num_kv_heads=2, head_dim=8, vocab_size=128)
P = 4


def make_kv(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(FP.num_layers, 2, FP.num_kv_heads, P, FP.head_dim, generator=g).to(dtype)  # [L,2,H,P,d]


def encode(kv: torch.Tensor, **overrides: object) -> bytes:
    args: dict = dict(task_id="summarize", tenant="acme", version=7, fingerprint=FP, created_at=None)
    args.update(overrides)
    return encode_artifact(kv, **args)


def header_of(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(dtype: torch.dtype) -> None:
    kv = make_kv(dtype)
    blob = encode(kv, created_at="2025-01-02T03:04:05.000Z")
    art = decode_artifact(blob)
    assert art.key_values.dtype == dtype
    assert torch.equal(art.key_values, kv)
    m = art.metadata
    assert (m.task_id, m.tenant, m.version, m.num_virtual_tokens) == ("summarize", "acme", 7, P)
    assert m.fingerprint == FP
    assert m.created_at == "2025-01-02T03:04:05.000Z"
    assert m.dtype == str(dtype).removeprefix("torch.")
    assert m.sha256 == tensor_sha256(kv)
    assert m.nbytes == kv.numel() * kv.element_size()
    assert m.to_public_dict() == {
        "task_id": "summarize",
        "version": 7,
        "num_virtual_tokens": P,
        "sha256": m.sha256,
        "bytes": kv.numel() * kv.element_size(),
        "created_at": "2025-01-02T03:04:05.000Z",
        "dtype": m.dtype,
    }


def test_on_disk_layout_is_plain_safetensors() -> None:
    kv = make_kv()
    blob = encode(kv)
    tensors = load(blob)
    assert sorted(tensors) == sorted(f"layers.{i}.{n}" for i in range(3) for n in ("key", "value"))
    for layer in range(3):
        assert tensors[f"layers.{layer}.key"].shape == (FP.num_kv_heads, P, FP.head_dim)
        assert torch.equal(tensors[f"layers.{layer}.key"], kv[layer, 0])
        assert torch.equal(tensors[f"layers.{layer}.value"], kv[layer, 1])
    meta = header_of(blob)[0]["__metadata__"]
    assert meta["format"] == "prefix-serve" and meta["format_version"] == "1"
    assert json.loads(meta["fingerprint"]) == FP.to_dict()
    assert meta["created_at"].endswith("Z") and "layers.{l}" in meta["layout"]
    # sha256 covers layer 0 key, layer 0 value, layer 1 key, ... in that order.
    h = hashlib.sha256()
    for layer in range(3):
        for kv_index in (0, 1):
            h.update(kv[layer, kv_index].contiguous().numpy().tobytes())
    assert meta["sha256"] == h.hexdigest()


def test_read_metadata_from_header_only() -> None:
    blob = encode(make_kv())
    (n,) = struct.unpack("<Q", blob[:8])
    full = decode_artifact(blob).metadata
    assert read_metadata(blob) == full
    assert read_metadata(blob[: 8 + n]) == full
    assert isinstance(full, PrefixMetadata)


def test_encode_checks_ids_and_shape() -> None:
    with pytest.raises(InvalidTaskId):
        encode(make_kv(), task_id="../etc")
    with pytest.raises(InvalidPrefix, match="num_layers: prefix has 2, model has 3"):
        encode(make_kv()[:2])


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_data_byte_is_corrupt(where: str) -> None:
    blob = bytearray(encode(make_kv()))
    (n,) = struct.unpack("<Q", blob[:8])
    pos = {"first": 8 + n, "middle": (8 + n + len(blob)) // 2, "last": len(blob) - 1}[where]
    blob[pos] ^= 0x01
    with pytest.raises(CorruptPrefix, match="checksum"):
        decode_artifact(bytes(blob))


def test_random_bytes_and_truncations_raise_invalid_prefix_only() -> None:
    rng = random.Random(1234)
    blob = encode(make_kv())
    candidates = [b"", b"\x00" * 7, b"\xff" * 8, b"{}", struct.pack("<Q", 2**63) + b"{}"]
    candidates += [rng.randbytes(rng.randrange(0, 400)) for _ in range(200)]
    candidates += [blob[:cut] for cut in range(0, len(blob) - 1, 7)]
    # Valid length prefix followed by junk, and deeply nested JSON.
    candidates += [struct.pack("<Q", 50) + rng.randbytes(50) for _ in range(50)]
    nested = b"[" * 100_000 + b"]" * 100_000
    candidates.append(struct.pack("<Q", len(nested)) + nested)
    for candidate in candidates:
        with pytest.raises(InvalidPrefix):
            decode_artifact(candidate)
        with pytest.raises(InvalidPrefix):
            parse_uploaded_native(candidate)


def test_mutated_header_never_escapes_the_taxonomy() -> None:
    rng = random.Random(99)
    blob = encode(make_kv())
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(300):
        mutated = bytearray(blob)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(8, 8 + n)] = rng.randrange(256)
        with contextlib.suppress(InvalidPrefix, CorruptPrefix):
            decode_artifact(bytes(mutated))  # anything else fails the test


def _tamper(mutate) -> bytes:  # type: ignore[no-untyped-def]
    header, data = header_of(encode(make_kv()))
    mutate(header)
    return with_header(header, data)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: h["__metadata__"].update(format="other"), "not a prefix-serve prefix"),
        (lambda h: h["__metadata__"].update(format_version="2"), "unsupported format_version 2"),
        (lambda h: h["__metadata__"].update(num_virtual_tokens="5"), "num_virtual_tokens"),
        (lambda h: h["__metadata__"].update(dtype="float16"), "dtype"),
        (lambda h: h["__metadata__"].update(fingerprint="{"), "fingerprint"),
        (lambda h: h["__metadata__"].update(tenant="../x"), "tenant"),
        (lambda h: h["__metadata__"].pop("sha256"), "sha256"),
        (lambda h: h.pop("layers.2.value"), "bytes after the last tensor"),  # its bytes, indexed by none
        (lambda h: h.update({"extra": h["layers.0.key"]}), "overlaps the tensor before it"),  # the same bytes
        (lambda h: h["layers.1.key"].update(data_offsets=h["layers.0.key"]["data_offsets"]), "overlaps"),
        (lambda h: h.pop("layers.0.value"), "leaves unindexed bytes before it"),
        (lambda h: h["layers.1.key"].update(dtype="I64"), "unsupported dtype"),
        (lambda h: h["layers.1.key"].update(shape=[2, 4, -8]), "negative"),
        (lambda h: h["layers.1.key"].update(shape=[2, 8, 4]), "expected"),
        (lambda h: h["layers.1.key"].update(data_offsets=[0, 10**9]), "outside the data"),
        (lambda h: h["layers.1.key"].update(data_offsets=[0]), "data_offsets"),
        (lambda h: h["layers.1.key"].update(data_offsets=[0, True]), "data_offsets must be two integers"),
        (lambda h: h["layers.1.key"].update(shape=[2, True, 4]), "shape must be a list of integers"),
        (lambda h: h["layers.1.key"].update(shape=[2, 8.0, 4]), "shape must be a list of integers"),
        (lambda h: h["layers.1.key"].update(shape="2x8x4"), "shape must be a list of integers"),
    ],
)
def test_malformed_artifacts_are_invalid(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidPrefix, match=message):
        decode_artifact(_tamper(mutate))


@pytest.mark.parametrize("shape", [[3, 0, 10**20], [2**62, 0, 2**62]])
def test_zero_size_tensors_of_huge_dimensions_are_invalid(shape: list[int]) -> None:
    """Their byte count (0) matches any shape with a 0 in it: the stack they are copied into overflowed (a 500)."""
    header = {
        f"layers.{layer}.{kv}": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
        for layer in range(2)
        for kv in ("key", "value")
    }
    with pytest.raises(InvalidPrefix, match="dimension above"):
        parse_uploaded_native(with_header(header, b""))


def test_missing_and_extra_tensors_are_named() -> None:
    tensors = {
        f"layers.{layer}.{n}": make_kv()[layer, i].clone() for layer in range(3) for i, n in enumerate(("key", "value"))
    }
    missing = {name: t for name, t in tensors.items() if name != "layers.2.value"}
    with pytest.raises(
        InvalidPrefix, match=r"expected tensors layers\.0\.\.2\.\{key,value\}; missing layers\.2\.value$"
    ):
        parse_uploaded_native(save(missing))
    with pytest.raises(InvalidPrefix, match=r"; unexpected extra$"):
        parse_uploaded_native(save({**tensors, "extra": torch.zeros(1)}))
    with pytest.raises(InvalidPrefix, match=r"layers\.99999 is named, but there are only 6 tensors"):
        parse_uploaded_native(save({**missing, "layers.99999.value": torch.zeros(1)}))
    with pytest.raises(InvalidPrefix, match=r"PEFT checkpoint's adapter_model\.safetensors: upload it with its"):
        parse_uploaded_native(save({"prompt_embeddings": torch.zeros(4, 8)}))
    with pytest.raises(InvalidPrefix, match="bytes after the last tensor"):
        parse_uploaded_native(save(tensors) + b"polyglot")


def test_stored_fingerprint_must_match_tensors() -> None:
    wrong = ModelFingerprint("llama", 30, 2, 8, 128)
    blob = _tamper(lambda h: h["__metadata__"].update(fingerprint=json.dumps(wrong.to_dict())))
    with pytest.raises(InvalidPrefix, match="num_layers: prefix has 3, model has 30"):
        decode_artifact(blob)


def test_validate_key_values_accepts_good_prefix() -> None:
    validate_key_values(make_kv(), FP, max_virtual_tokens=P)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_rejected(bad: float) -> None:
    kv = make_kv()
    kv[2, 1, 1, 3, 7] = bad
    with pytest.raises(InvalidPrefix, match="non-finite"):
        validate_key_values(kv, FP, max_virtual_tokens=16)


def test_fingerprint_mismatch_names_the_field() -> None:
    model = ModelFingerprint("llama", num_layers=30, num_kv_heads=2, head_dim=8, vocab_size=128)
    with pytest.raises(InvalidPrefix, match=r"does not fit this model: num_layers: prefix has 3, model has 30"):
        validate_key_values(make_kv(), model, max_virtual_tokens=16)
    model = ModelFingerprint("llama", num_layers=3, num_kv_heads=3, head_dim=64, vocab_size=128)
    with pytest.raises(InvalidPrefix, match="num_kv_heads: prefix has 2, model has 3; head_dim: prefix has 8"):
        validate_key_values(make_kv(), model, max_virtual_tokens=16)


@pytest.mark.parametrize(
    ("kv", "message"),
    [
        (make_kv()[:, :, :, :0], "between 1 and 16"),
        (torch.zeros(3, 2, 2, 17, 8), "between 1 and 16, got 17"),
        (make_kv()[0], "shape"),
        (torch.zeros(3, 3, 2, 4, 8), "shape"),
        (torch.zeros(3, 2, 2, 4, 8, dtype=torch.int64), "dtype"),
    ],
)
def test_bad_shapes_and_dtypes_rejected(kv: torch.Tensor, message: str) -> None:
    with pytest.raises(InvalidPrefix, match=message):
        validate_key_values(kv, FP, max_virtual_tokens=16)


def test_parse_uploaded_native_ignores_uploader_ids() -> None:
    kv = make_kv()
    assert torch.equal(parse_uploaded_native(encode(kv, tenant="someone-else", version=99)), kv)


def test_parse_uploaded_native_refuses_a_prefix_made_for_another_model() -> None:
    """A file that says which model it was made for (its fingerprint) must say this one's, even where the tensors'
    shapes would fit: another vocabulary, another architecture. Bare tensors say nothing and are taken."""
    kv = make_kv()
    assert torch.equal(parse_uploaded_native(encode(kv), FP), kv)
    other = ModelFingerprint("gpt2", num_layers=3, num_kv_heads=2, head_dim=8, vocab_size=50257)
    gpt2 = _tamper(lambda h: h["__metadata__"].update(fingerprint=json.dumps(other.to_dict())))
    with pytest.raises(InvalidPrefix, match="made for another model: architecture: prefix has gpt2, model has llama"):
        parse_uploaded_native(gpt2, FP)
    with pytest.raises(InvalidPrefix, match="metadata fingerprint"):
        parse_uploaded_native(_tamper(lambda h: h["__metadata__"].update(fingerprint="{")), FP)


def test_parse_uploaded_native_accepts_bare_tensors() -> None:
    kv = make_kv()
    tensors = {
        f"layers.{layer}.{n}": kv[layer, i].clone() for layer in range(3) for i, n in enumerate(("key", "value"))
    }
    assert torch.equal(parse_uploaded_native(save(tensors)), kv)


def test_parse_uploaded_native_checks_sha_and_format() -> None:
    blob = bytearray(encode(make_kv()))
    blob[-1] ^= 0xFF
    with pytest.raises(InvalidPrefix, match="sha256"):
        parse_uploaded_native(bytes(blob))
    with pytest.raises(InvalidPrefix, match="format"):
        parse_uploaded_native(_tamper(lambda h: h["__metadata__"].update(format="gguf")))


def test_files_that_are_not_safetensors_say_what_they_look_like() -> None:
    with pytest.raises(InvalidPrefix, match=r"implausible .*zip archive"):
        parse_uploaded_native(b"PK\x03\x04" + bytes(100))
    with pytest.raises(InvalidPrefix, match=r"implausible .*it is JSON"):
        parse_uploaded_native(b'{"peft_type": "PREFIX_TUNING", "num_layers": 30}')
