"""Large prefixes read in pieces (prefix_store/piecewise.py): from memory, disk and a real redis-server."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from prefix_store.artifact import decode_artifact, encode_artifact
from prefix_store.backends import DiskBackend, RedisBackend
from prefix_store.backends.base import BlobReader, PrefixBackend, WholeBlobReader
from prefix_store.errors import CorruptPrefix, InvalidPrefix, PrefixNotFound, StoreUnavailable
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.piecewise import FIRST_READ_BYTES, plan_pieces, read_artifact
from prefix_store.registry import PrefixRegistry
from prefix_store.safetensors_io import read_header
from tests.redis_server import RedisServer

T = TypeVar("T")

# 12 layers: safetensors stores them in name order (0, 1, 10, 11, 2, ...), not in the checksum's layer order.
FP = ModelFingerprint("llama", num_layers=12, num_kv_heads=2, head_dim=8, vocab_size=128)
P = 128  # 8 KiB a tensor, 192 KiB a blob: more than the first read
ENTRY_BYTES = 2 * P * 8 * 4
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def make_kv(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(FP.num_layers, 2, FP.num_kv_heads, P, FP.head_dim, generator=g).to(dtype)


def make_blob(seed: int = 0, dtype: torch.dtype = torch.float32) -> bytes:
    return encode_artifact(make_kv(seed, dtype), task_id="sum", tenant="acme", version=1, fingerprint=FP)


class CountingReader(WholeBlobReader):
    """An in-memory reader that records every read."""

    def __init__(self, blob: bytes) -> None:
        super().__init__(blob, FIRST_READ_BYTES)
        self.reads: list[list[tuple[int, int]]] = []

    def read(self, ranges):  # type: ignore[no-untyped-def]
        self.reads.append(list(ranges))
        return super().read(ranges)


class CountingRunner:
    """A CpuRunner that runs work at once and counts the bites."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, fn: Callable[[], T]) -> T:
        self.runs += 1
        return fn()


def test_pieces_cover_every_segment_in_order_within_the_budget() -> None:
    # Three entries of 10 bytes; the first two are neighbours in the blob, the third lies elsewhere.
    segments = [(100, 110, 0), (110, 120, 10), (300, 310, 20)]
    for budget in (1, 3, 7, 10, 15, 20, 25, 30, 1000):
        pieces = plan_pieces(segments, budget)
        assert all(sum(end - start for start, end, _ in piece) <= budget for piece in pieces)
        assert all(sum(end - start for start, end, _ in piece) == budget for piece in pieces[:-1])  # full but the last
        flat = [
            (b, o)
            for piece in pieces
            for start, end, offset in piece
            for b, o in zip(range(start, end), range(offset, offset + end - start), strict=True)
        ]
        assert flat == [
            (b, o)
            for start, end, offset in segments
            for b, o in zip(range(start, end), range(offset, offset + end - start), strict=True)
        ]
    # Neighbours in the blob become one range: one GETRANGE, not two.
    assert plan_pieces(segments, 1000) == [[(100, 120, 0), (300, 310, 20)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("piece_bytes", [1000, ENTRY_BYTES, 3 * ENTRY_BYTES + 17, 10**6, 0])
def test_read_in_pieces_equals_decoding_the_whole_blob(dtype: torch.dtype, piece_bytes: int) -> None:
    blob = make_blob(dtype=dtype)
    reader, runner = CountingReader(blob), CountingRunner()
    artifact = read_artifact(reader, piece_bytes=piece_bytes, run_cpu=runner)
    whole = decode_artifact(blob)
    assert artifact.metadata == whole.metadata
    assert artifact.key_values.dtype == dtype and torch.equal(artifact.key_values, make_kv(dtype=dtype))
    tensor_bytes = 2 * FP.num_layers * ENTRY_BYTES // (2 if dtype == torch.bfloat16 else 1)
    if 0 < piece_bytes < tensor_bytes:
        # The header came with the first read; then one read per piece, none over the budget, one section each.
        pieces = -(-tensor_bytes // piece_bytes)
        assert len(reader.reads) == pieces and runner.runs == pieces
        assert all(sum(end - start for start, end in ranges) <= piece_bytes for ranges in reader.reads)
    else:
        assert len(reader.reads) == 1 and runner.runs == 1  # the rest of the blob in one read


def test_with_fetch_in_each_piece_is_fetched_inside_it_with_its_cpu_work() -> None:
    """A store on this machine: the fetch is CPU too, so it runs where the piece's hashing and copying run (the
    server's StepGaps.run_held: between two engine steps); the header's read stays outside."""
    blob = make_blob(seed=3)
    reader = CountingReader(blob)
    inside: list[int] = []  # reads done so far, at each entry into the runner
    reads_inside = 0

    def fetch_in(fn: Callable[[], T]) -> T:
        nonlocal reads_inside
        before = len(reader.reads)
        inside.append(before)
        result = fn()
        reads_inside += len(reader.reads) - before
        return result

    artifact = read_artifact(reader, piece_bytes=3 * ENTRY_BYTES, run_cpu=CountingRunner(), fetch_in=fetch_in)
    assert torch.equal(artifact.key_values, make_kv(seed=3))
    pieces = -(-2 * FP.num_layers * ENTRY_BYTES // (3 * ENTRY_BYTES))
    assert len(inside) == pieces and reads_inside == pieces == len(reader.reads)  # every piece's read, inside


def test_pieces_follow_the_checksum_order_not_the_file_order() -> None:
    blob = make_blob()
    header = read_header(blob)
    reader = CountingReader(blob)
    read_artifact(reader, piece_bytes=ENTRY_BYTES, run_cpu=CountingRunner())
    # One tensor per piece: layer 0 key, layer 0 value, layer 1 key, ... wherever the file keeps them.
    expected = [
        [(header.tensors[f"layers.{i}.{kv}"].start, header.tensors[f"layers.{i}.{kv}"].end)]
        for i in range(12)
        for kv in ("key", "value")
    ]
    assert reader.reads == expected
    assert header.tensors["layers.10.key"].start < header.tensors["layers.2.key"].start  # the file's name order


@pytest.mark.parametrize("where", ["first tensor", "a middle tensor", "last byte"])
def test_a_corrupt_tensor_byte_fails_the_checksum(where: str) -> None:
    blob = bytearray(make_blob())
    header = read_header(bytes(blob))
    offset = {
        "first tensor": header.tensors["layers.0.key"].start + 5,
        "a middle tensor": header.tensors["layers.7.value"].start + 100,
        "last byte": len(blob) - 1,
    }[where]
    blob[offset] ^= 0x01
    with pytest.raises(CorruptPrefix, match="failed its checksum"):
        read_artifact(WholeBlobReader(bytes(blob), FIRST_READ_BYTES), piece_bytes=5000, run_cpu=CountingRunner())


def test_a_truncated_blob_is_invalid_not_a_crash() -> None:
    blob = make_blob()
    for cut in (4, 200, len(blob) - 1):
        with pytest.raises(InvalidPrefix):
            read_artifact(WholeBlobReader(blob[:cut], FIRST_READ_BYTES), piece_bytes=5000, run_cpu=CountingRunner())


def _upload(backend: PrefixBackend, **registry_kwargs: object) -> PrefixRegistry:
    registry = PrefixRegistry(backend, FP, max_virtual_tokens=P, **registry_kwargs)  # type: ignore[arg-type]
    registry.upload("acme", "sum", make_kv())
    return registry


def _cold_resolve(backend: PrefixBackend, **registry_kwargs: object) -> torch.Tensor:
    registry = PrefixRegistry(backend, FP, max_virtual_tokens=P, **registry_kwargs)  # type: ignore[arg-type]
    return registry.resolve("acme", "sum").key_values


def test_disk_store_reads_in_pieces_and_survives_a_delete_mid_read(tmp_path: Path) -> None:
    backend = DiskBackend(tmp_path)
    _upload(backend)
    runner = CountingRunner()
    kv = _cold_resolve(backend, load_piece_bytes=ENTRY_BYTES, run_cpu_work=runner, cpu_work_min_bytes=1)
    assert torch.equal(kv, make_kv()) and runner.runs == 2 * FP.num_layers
    # The reader keeps the version's file open: deleting the task mid-read does not tear the load.
    reader = backend.open_blob("acme", "sum", 1, FIRST_READ_BYTES)
    backend.delete("acme", "sum")
    artifact = read_artifact(reader, piece_bytes=ENTRY_BYTES, run_cpu=CountingRunner())
    reader.close()
    assert torch.equal(artifact.key_values, make_kv())
    with pytest.raises(PrefixNotFound):
        backend.open_blob("acme", "sum", 1, FIRST_READ_BYTES)


@pytest.fixture
def redis_server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    return make_redis_server()


@pytest.fixture
def redis_backend(redis_server: RedisServer) -> Iterator[RedisBackend]:
    backend = RedisBackend(redis_server.url)
    yield backend
    backend.close()


def _calls(server: RedisServer, command: str) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@needs_redis
def test_redis_reads_a_large_prefix_in_pieces(redis_backend: RedisBackend, redis_server: RedisServer) -> None:
    _upload(redis_backend)
    runner = CountingRunner()
    ranges_before = _calls(redis_server, "getrange")
    kv = _cold_resolve(redis_backend, load_piece_bytes=3 * ENTRY_BYTES, run_cpu_work=runner, cpu_work_min_bytes=1)
    assert torch.equal(kv, make_kv())
    assert runner.runs == 8  # 24 tensors, 3 a piece
    # The file keeps layers in name order: 0, 1, 10, 11, 2, 3, ..., 9. Pieces go in layer order, so
    # [1.value, 2.key, 2.value] and [9.key, 9.value, 10.key] are two ranges each, the other six pieces one.
    assert _calls(redis_server, "getrange") - ranges_before == 1 + 10  # the first read, then the pieces' ranges
    # Read whole with pieces off: one range after the first read.
    ranges_before = _calls(redis_server, "getrange")
    assert torch.equal(_cold_resolve(redis_backend, load_piece_bytes=0), make_kv())
    assert _calls(redis_server, "getrange") - ranges_before == 2


@needs_redis
def test_redis_piece_corruption_is_never_served(redis_backend: RedisBackend, redis_server: RedisServer) -> None:
    _upload(redis_backend)
    client = redis_server.client()
    data = bytearray(client.get("ps:{acme/sum}:v:1"))  # type: ignore[arg-type]
    data[-3] ^= 0x10
    client.set("ps:{acme/sum}:v:1", bytes(data))
    registry = PrefixRegistry(redis_backend, FP, max_virtual_tokens=P, load_piece_bytes=ENTRY_BYTES)
    for _ in range(2):
        with pytest.raises(CorruptPrefix):
            registry.resolve("acme", "sum")


@needs_redis
def test_redis_version_deleted_mid_read_is_not_found(redis_backend: RedisBackend) -> None:
    _upload(redis_backend)
    reader = redis_backend.open_blob("acme", "sum", 1, FIRST_READ_BYTES)
    redis_backend.delete("acme", "sum")
    with pytest.raises(PrefixNotFound, match="deleted while it was being read"):
        read_artifact(reader, piece_bytes=ENTRY_BYTES, run_cpu=CountingRunner())


@needs_redis
def test_redis_down_mid_read_is_store_unavailable(redis_backend: RedisBackend, redis_server: RedisServer) -> None:
    _upload(redis_backend)

    def stop_redis_after_the_first_piece(fn: Callable[[], T]) -> T:
        result = fn()
        redis_server.stop()  # a no-op once it is stopped
        return result

    registry = PrefixRegistry(
        redis_backend,
        FP,
        max_virtual_tokens=P,
        load_piece_bytes=ENTRY_BYTES,
        run_cpu_work=stop_redis_after_the_first_piece,
        cpu_work_min_bytes=1,
    )
    with pytest.raises(StoreUnavailable):
        registry.resolve("acme", "sum")


@needs_redis
def test_redis_reads_and_deletes_blobs_stored_in_the_old_layout(
    redis_backend: RedisBackend, redis_server: RedisServer
) -> None:
    # Before blobs were strings, a task's versions were fields of one hash. Move v1 there, as an old server left it.
    _upload(redis_backend)
    client = redis_server.client()
    blob = client.get("ps:{acme/sum}:v:1")
    client.delete("ps:{acme/sum}:v:1")
    client.hset("ps:{acme/sum}:blob", "1", blob)  # type: ignore[arg-type]
    gets, hgets = _calls(redis_server, "get"), _calls(redis_server, "hget")
    reader = redis_backend.open_blob("acme", "sum", 1, FIRST_READ_BYTES)
    assert reader.size == len(blob)  # found in the old hash in the opening round trip: no GET, one HGET
    assert (_calls(redis_server, "get"), _calls(redis_server, "hget")) == (gets, hgets + 1)
    for piece_bytes in (ENTRY_BYTES, 0):
        assert torch.equal(_cold_resolve(redis_backend, load_piece_bytes=piece_bytes), make_kv())
    assert redis_backend.get("acme", "sum") == blob and redis_backend.get("acme", "sum", 1) == blob
    # A new upload prunes old versions from either layout, and a delete clears both.
    for _ in range(5):
        _upload(redis_backend)
    assert client.hlen("ps:{acme/sum}:blob") == 0
    client.hset("ps:{acme/sum}:blob", "6", blob)  # type: ignore[arg-type]
    assert redis_backend.delete("acme", "sum")
    assert [k for k in client.scan_iter("ps:{acme/sum}:*") if not k.endswith(b":seq")] == []


def _reader_type(backend: PrefixBackend, version: int) -> type[BlobReader]:
    reader = backend.open_blob("acme", "sum", version, FIRST_READ_BYTES)
    reader.close()
    return type(reader)


@needs_redis
def test_stores_open_ranges_not_whole_blobs(redis_backend: RedisBackend, tmp_path: Path) -> None:
    for backend in (redis_backend, DiskBackend(tmp_path)):
        _upload(backend)
        assert _reader_type(backend, 1) is not WholeBlobReader
        reader = backend.open_blob("acme", "sum", 1, FIRST_READ_BYTES)
        assert len(reader.first) == FIRST_READ_BYTES and reader.size > FIRST_READ_BYTES
        reader.close()
        with pytest.raises(PrefixNotFound):
            backend.open_blob("acme", "sum", 2, FIRST_READ_BYTES)


def test_small_blobs_are_not_handed_to_the_runner(tmp_path: Path) -> None:
    backend = DiskBackend(tmp_path)
    _upload(backend)
    runner = CountingRunner()
    small_enough = 10**9  # no blob reaches it: nothing goes through the runner
    _cold_resolve(backend, load_piece_bytes=ENTRY_BYTES, run_cpu_work=runner, cpu_work_min_bytes=small_enough)
    assert runner.runs == 0
