"""Reading a stored artifact in pieces, so a large prefix's load spreads over many small bites of CPU.

A P = 200 prefix of the default model is 9.2 MB. Fetched, hashed and unpacked at once, it costs ~20 ms of CPU
on the cores that also run the decode steps (the store's side of the fetch too, when Redis is local), and the
step it lands on shows it in every stream's inter-token latency. Read in pieces of ~2 MiB, each piece is
fetched while a step runs, then hashed and copied into place between two steps (by ``run_cpu``, which the
server points at the engine's step gaps): each step carries a fifth of the cost.

The tensors are fetched in the order the checksum covers them (layer 0 key, layer 0 value, layer 1 key, ...),
which is also the order of the unpacked ``[L, 2, H_kv, P, d]`` tensor, so the sha256 is computed as the pieces
arrive. A safetensors file stores them in name order (layers.0, layers.1, layers.10, ...), so a piece may be
a few ranges of the blob, read in one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np
import torch

from prefix_store.artifact import PrefixArtifact, decode_artifact, layer_entries, metadata_from_header
from prefix_store.backends.base import BlobReader
from prefix_store.errors import CorruptPrefix, InvalidPrefix
from prefix_store.safetensors_io import MAX_HEADER_BYTES, read_header

# Read when the blob is opened: enough for the header of any prefix (a few KiB), and small blobs whole.
FIRST_READ_BYTES = 64 * 2**10
DEFAULT_PIECE_BYTES = 2 * 2**20

# A range of the blob and where its bytes go in the unpacked tensor's bytes: (start, end, offset).
Segment = tuple[int, int, int]
T = TypeVar("T")


class CpuRunner(Protocol):
    """Runs a bite of CPU work somewhere (``StepGaps.run``: between two engine steps) and returns its result."""

    def __call__(self, fn: Callable[[], T], /) -> T: ...


def run_here(fn: Callable[[], T]) -> T:
    """The plain CpuRunner: at once, on the calling thread."""
    return fn()


def plan_pieces(segments: list[Segment], piece_bytes: int) -> list[list[Segment]]:
    """The segments (in checksum order) cut into pieces of at most ``piece_bytes``, neighbours merged."""
    pieces: list[list[Segment]] = []
    current: list[Segment] = []
    room = piece_bytes
    for start, end, offset in segments:
        while start < end:
            if room == 0:
                pieces.append(current)
                current, room = [], piece_bytes
            take = min(end - start, room)
            if current and current[-1][1] == start:  # continues the last range: one range, one read
                s, _, o = current[-1]
                current[-1] = (s, start + take, o)
            else:
                current.append((start, start + take, offset))
            start, offset, room = start + take, offset + take, room - take
    if current:
        pieces.append(current)
    return pieces


def read_artifact(
    reader: BlobReader,
    *,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    run_cpu: CpuRunner = run_here,
    fetch_in: CpuRunner | None = None,
) -> PrefixArtifact:
    """Decode and verify the artifact ``reader`` reads, in pieces of at most ``piece_bytes`` of tensor data.

    Each bite of CPU work (hashing, unpacking a piece) goes through ``run_cpu``; fetches do not, unless
    ``fetch_in`` is given: each piece's fetch and CPU work then go through it together (a store on this
    machine, whose fetches are CPU, the store's and ours; ``StepGaps.run_held``). A blob of at
    most ``piece_bytes`` is read whole and decoded at once, and ``piece_bytes <= 0`` reads every blob whole.
    Raises what ``decode_artifact`` raises (CorruptPrefix, InvalidPrefix), and the reader's errors.
    """
    first = reader.first
    if len(first) < reader.size and (piece_bytes <= 0 or reader.size <= piece_bytes):
        first += reader.read([(len(first), reader.size)])[0]
    if len(first) >= reader.size:
        whole = first
        return run_cpu(lambda: decode_artifact(whole))

    header_end = 8 + int.from_bytes(first[:8], "little") if len(first) >= 8 else 0
    if len(first) < header_end <= min(8 + MAX_HEADER_BYTES, reader.size):
        first += reader.read([(len(first), header_end)])[0]
    header = read_header(first, allow_truncated_data=True)  # InvalidPrefix if malformed
    pairs = layer_entries(header)
    metadata = metadata_from_header(header, pairs)
    entries = [entry for pair in pairs for entry in pair]  # checksum order
    if max(entry.end for entry in entries) > reader.size:
        raise InvalidPrefix(f"tensor data runs past the end of the blob ({reader.size} bytes)")

    H, P, d = pairs[0][0].shape
    out = torch.empty((len(pairs), 2, H, P, d), dtype=pairs[0][0].dtype)
    out_bytes = out.view(-1).view(torch.uint8).numpy()  # [L * 2 * H * P * d * itemsize], writes land in out
    entry_bytes = entries[0].end - entries[0].start
    segments = [(entry.start, entry.end, i * entry_bytes) for i, entry in enumerate(entries)]
    digest = hashlib.sha256()

    def take(piece: list[Segment], parts: list[bytes]) -> None:
        for (_, _, offset), part in zip(piece, parts, strict=True):
            digest.update(part)
            out_bytes[offset : offset + len(part)] = np.frombuffer(part, dtype=np.uint8)

    for piece in plan_pieces(segments, piece_bytes):
        ranges = [(start, end) for start, end, _ in piece]
        if fetch_in is not None:  # the fetch and the CPU work together, where fetch_in runs them
            fetch_in(lambda piece=piece, ranges=ranges: take(piece, reader.read(ranges)))
            continue
        parts = reader.read(ranges)  # network or disk: never in run_cpu
        run_cpu(lambda piece=piece, parts=parts: take(piece, parts))
    actual = digest.hexdigest()
    if actual != metadata.sha256:
        raise CorruptPrefix(
            f"prefix {metadata.tenant}/{metadata.task_id} v{metadata.version} failed its checksum "
            f"(recorded {metadata.sha256[:12]}…, actual {actual[:12]}…)"
        )
    return PrefixArtifact(key_values=out, metadata=metadata)
