"""The running batch: padded KV of many requests, each with its own prefix.

Layout (TGI's padded continuous batching, plus per-row prefixes):

* per layer ``keys[l]`` / ``values[l]``: [B, H_kv, C, d] buffers whose first T
  columns are in use (T = ``width``; the rest is room for decode steps to write
  in place, see kv_cache.py). Columns of a row are padding (mask 0) or real
  (mask 1). A row's real columns are its prefix's P virtual tokens followed by
  its tokens, in order; padding sits before them and,
  after a prefill of prompts of unequal length, between prefix and prompt.
* ``attention_mask``: [B, T] int64, 1 over real columns.
* ``next_positions``: [B] position id of each row's next input token,
  P + tokens already in the KV: prefix keys carry no rotary position, so real
  tokens start at P exactly as in PEFT's training forward.
* ``next_input_ids``: [B] each row's last sampled token, not yet in the KV.

Invariant (``check``): every row has as many real columns as its next
position, so no row ever reads another row's prefix or tokens (rows are
independent in attention; padding is masked).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from server.kv_cache import HEADROOM_COLUMNS, RESERVED_DECODE_COLUMNS, allocate, with_room
from server.prompt_cache import CachedPrompt
from server.sampling import SamplingBatch, SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """What it takes to start a row: the prompt, its sampling, and its prefix if any."""

    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams
    prefix_kv: torch.Tensor | None = None  # [L, 2, H_kv, P, d], any device/dtype
    prefix_id: str | None = None
    # The prompt's first tokens' K/V from the prompt cache (server/prompt_cache.py): copied in after the prefix,
    # so that only the rest of the prompt is computed. ``prompt_ids`` stays the whole prompt.
    cached: CachedPrompt | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[3]

    @property
    def cached_len(self) -> int:
        return 0 if self.cached is None else self.cached.tokens

    @property
    def computed_ids(self) -> Sequence[int]:
        """The prompt tokens the prefill computes: those after the cached head."""
        return self.prompt_ids[self.cached_len :]


@dataclass(frozen=True)
class PrefillInputs:
    """The prompts of new rows, left-padded: the inputs of their prefill forward."""

    input_ids: torch.Tensor  # [B, N_max]
    position_ids: torch.Tensor  # [B, N_max]: P_i, P_i + 1, ... on each row's real tokens
    attention_mask: torch.Tensor  # [B, P_max + N_max]: [prefix slots | prompt slots]


@dataclass(frozen=True)
class RowInfo:
    """Who a row belongs to. Rebuilt only by indexing lists of these, never field by field."""

    request_id: str
    prefix_id: str | None  # "tenant/task@version#sha256-prefix", or None for the base model
    prefix_len: int


@dataclass
class Batch:
    rows: list[RowInfo]
    keys: list[torch.Tensor]  # per layer [B, H_kv, C, d], C >= T; columns [0, T) in use
    values: list[torch.Tensor]  # per layer [B, H_kv, C, d]
    attention_mask: torch.Tensor  # [B, T] int64
    next_positions: torch.Tensor  # [B] int64
    next_input_ids: torch.Tensor  # [B] int64
    sampling: SamplingBatch
    # Buffers made for these rows reserve the columns their decode steps may still write (``from_requests``'s
    # ``reserve_decode``, up to RESERVED_DECODE_COLUMNS), and joins and compaction keep that room, so decode
    # steps do not grow them.
    keeps_room: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """T, the padded KV length shared by all rows."""
        return self.attention_mask.shape[1]

    @property
    def room(self) -> int:
        """Free columns after T: decode steps the buffers take before they grow."""
        return self.keys[0].shape[2] - self.width

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.rows]

    def indices_of(self, request_ids: Sequence[str]) -> list[int]:
        """Positions of the given requests' rows, in batch order (absent ids are skipped)."""
        wanted = set(request_ids)
        return [i for i, row in enumerate(self.rows) if row.request_id in wanted]

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[NewRequest],
        *,
        kv_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        place_prefix: Callable[[NewRequest], torch.Tensor],
        reserve_decode: bool = False,
    ) -> tuple[Batch, PrefillInputs]:
        """New rows holding only their prefixes, and the prompt inputs that the prefill forward appends.

        ``kv_shape`` is (layers, KV heads, head size); ``place_prefix`` gives a request's prefix
        [L, 2, H_kv, P, d] on ``device`` in ``dtype`` (the device tier of the prefix cache). The KV buffers
        have room for the prompts and the first decode steps: per layer [B, H_kv, P_max + N_max + headroom, d].
        With ``reserve_decode`` the room is every decode step the rows may take (the most ``max_new_tokens`` of
        any row, up to ``RESERVED_DECODE_COLUMNS``): where free columns cost no reads (the decode-attention
        kernel), a buffer that does not grow spares the copy and, on CUDA, the eager steps and the graph capture
        that follow every growth. Admission already counts each row's whole ``max_len`` (rows x the longest): the
        padding can add up to as much again where the longest prompt and the most new tokens belong to different
        rows.
        """
        num_layers, num_kv_heads, head_dim = kv_shape
        n_rows = len(requests)
        # A row's context before the prompt tokens it computes: its prefix, then its cached prompt head if any.
        prefix_lens = [r.prefix_len + r.cached_len for r in requests]
        prompt_lens = [len(r.computed_ids) for r in requests]
        p_max, n_max = max(prefix_lens), max(prompt_lens)
        room = HEADROOM_COLUMNS
        if reserve_decode:
            room = max(room, min(RESERVED_DECODE_COLUMNS, max(r.params.max_new_tokens for r in requests)))
        capacity = p_max + n_max + room
        # One buffer per layer and K/V, not views of one tensor: every batch's buffers are then laid out alike
        # (filtered, joined and grown ones are separate too), which a compiled decode step relies on.
        keys = [
            torch.zeros(n_rows, num_kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        values = [torch.zeros_like(keys[0]) for _ in range(num_layers)]
        input_ids = torch.zeros(n_rows, n_max, dtype=torch.int64)
        positions = torch.zeros(n_rows, n_max, dtype=torch.int64)
        mask = torch.zeros(n_rows, p_max + n_max, dtype=torch.int64)
        for i, req in enumerate(requests):
            p, n = prefix_lens[i], prompt_lens[i]
            start = p_max - p
            pieces = [] if req.prefix_kv is None else [place_prefix(req)]  # [L, 2, H_kv, P, d]
            pieces += [] if req.cached is None else [b.to(device, dtype) for b in req.cached.blocks]
            for piece in pieces:
                width = piece.shape[3]
                for layer in range(num_layers):
                    keys[layer][i, :, start : start + width] = piece[layer, 0]
                    values[layer][i, :, start : start + width] = piece[layer, 1]
                start += width
            input_ids[i, n_max - n :] = torch.tensor(list(req.computed_ids), dtype=torch.int64)
            positions[i, n_max - n :] = torch.arange(p, p + n)
            mask[i, p_max - p : p_max] = 1
            mask[i, p_max + n_max - n :] = 1
        mask = mask.to(device)
        batch = cls(
            rows=[RowInfo(r.request_id, r.prefix_id, r.prefix_len) for r in requests],
            keys=keys,
            values=values,
            attention_mask=mask[:, :p_max],
            next_positions=torch.tensor(prefix_lens, dtype=torch.int64, device=device),
            next_input_ids=torch.zeros(n_rows, dtype=torch.int64, device=device),
            sampling=SamplingBatch.from_params([r.params for r in requests], device, [r.prompt_ids for r in requests]),
            keeps_room=reserve_decode,
        )
        return batch, PrefillInputs(input_ids.to(device), positions.to(device), mask)

    def make_room_for_step(self) -> None:
        """Buffers with room for a decode step's column T (grown, so copied, only when full: kv_cache.py)."""
        width = self.width
        self.keys = [with_room(k, width, width + 1) for k in self.keys]
        self.values = [with_room(v, width, width + 1) for v in self.values]

    @property
    def inner_padding(self) -> int:
        """Columns ``compact`` would remove: the width beyond the most real columns of any row (host sync)."""
        return self.width - int(self.next_positions.max())

    def compact(self) -> None:
        """Squeeze the padding out from between rows' real columns (a speculative step leaves the rejected drafts'
        columns of rows that accepted fewer than others as padding): each row's real columns, in order, go to
        the right end of new buffers as wide as the most real columns of any row. Copies every row's KV."""
        mask = self.attention_mask.bool()  # [B, T]
        width = int(self.next_positions.max())  # real columns = next position (the batch invariant)
        # Per row, its padding columns then its real ones, each in order (a stable sort of 0s before 1s); the last
        # ``width``: every real column, right-aligned.
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, self.width - width :]  # [B, width]
        rows, heads, _, head_dim = self.keys[0].shape
        index = order[:, None, :, None].expand(rows, heads, width, head_dim)
        # The squeezed-out columns become room where the rows' decode steps are reserved.
        room = self.keys[0].shape[2] - width if self.keeps_room else HEADROOM_COLUMNS
        keys, values = [], []
        for old, new in ((self.keys, keys), (self.values, values)):
            for buffer in old:  # [B, H_kv, C, d]
                compacted = allocate(rows, heads, width, head_dim, like=buffer, room=room)
                compacted[:, :, :width] = buffer.gather(2, index)
                new.append(compacted)
        self.keys, self.values = keys, values
        self.attention_mask = self.attention_mask.gather(1, order)

    def filter(self, keep_request_ids: Sequence[str]) -> Batch | None:
        """Keep the given requests (in their current order); trim columns that are padding in every kept row."""
        keep = self.indices_of(keep_request_ids)
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        device = self.attention_mask.device
        index = torch.tensor(keep, dtype=torch.int64, device=device)
        mask = self.attention_mask[index]
        real = mask.any(dim=0)  # [T]: real in at least one kept row
        columns = None
        if not bool(real.all()):
            # Keep the real columns and the free room after T, so the buffers keep their headroom.
            room = torch.arange(self.width, self.keys[0].shape[2], device=device)
            columns = torch.cat([real.nonzero().squeeze(1), room])
            mask = mask[:, real]
        keys, values = [], []
        # Replace the sources layer by layer so the old tensors can be freed as we go.
        for k, v in zip(self.keys, self.values, strict=True):
            k, v = k.index_select(0, index), v.index_select(0, index)
            if columns is not None:
                k, v = k.index_select(2, columns), v.index_select(2, columns)
            keys.append(k)
            values.append(v)
        return self._rows_at(keep, index, keys, values, mask)

    def drop(self, leaving_request_ids: Collection[str]) -> Batch | None:
        """The batch without the given requests' rows: the last rows move into their slots, in the same buffers.

        On a CPU, ``filter`` copies every kept row into new buffers, and new memory is page-faulted in: dropping
        one row of 16 took 17-26 ms that way (6-9 ms once the allocator reuses freed blocks), against ~0.6 ms
        moving one row here. The row order changes, and the buffers keep the dropped rows' memory until they are
        next reallocated (grown, joined or filtered).
        The rows that run longest end first and leave leading columns that are padding in every kept row: those
        are cut off as a view (what ``filter`` would trim, with no copy). Where padding in every kept row would
        be left between real columns, or on an accelerator (where a copy is cheap and a step may still be
        reading these buffers), this is ``filter``.
        """
        leaving = set(self.indices_of(leaving_request_ids))
        n, kept = len(self.rows), len(self.rows) - len(leaving)
        if not leaving:
            return self
        in_order = [i for i in range(n) if i not in leaving]
        on_cpu = self.attention_mask.device.type == "cpu"
        first = self._first_real_column(in_order) if kept and on_cpu else None
        if first is None:
            return self.filter([self.rows[i].request_id for i in in_order])
        # Each slot a leaving row frees below `kept` takes a kept row from beyond it.
        holes = sorted(i for i in leaving if i < kept)
        movers = [i for i in in_order if i >= kept]
        order = list(range(kept))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        for buffers in (self.keys, self.values):
            for buffer in buffers:  # [B, H_kv, C, d]
                for hole, mover in zip(holes, movers, strict=True):
                    buffer[hole, :, first:].copy_(buffer[mover, :, first:])
        index = torch.tensor(order, dtype=torch.int64)
        # Views [kept, H_kv, C - first, d]: the free room after the width stays where it was.
        keys, values = [k[:kept, :, first:] for k in self.keys], [v[:kept, :, first:] for v in self.values]
        return self._rows_at(order, index, keys, values, self.attention_mask[index, first:])

    def _first_real_column(self, rows: list[int]) -> int | None:
        """The first column real in some of ``rows``; None where a later column is padding in all of them."""
        real = self.attention_mask[rows].any(dim=0)  # [T]
        first = int(real.int().argmax())
        return first if bool(real[first:].all()) else None

    def _rows_at(
        self,
        order: list[int],
        index: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> Batch:
        """A batch of this one's rows at ``order`` (``index``: the same, as a tensor on the batch's device), with
        their KV and mask already taken. This batch gives its buffers up."""
        self.keys, self.values = [], []
        return Batch(
            rows=[self.rows[i] for i in order],
            keys=keys,
            values=values,
            attention_mask=attention_mask,
            next_positions=self.next_positions[index],
            next_input_ids=self.next_input_ids[index],
            sampling=self.sampling.filter(index, order),
            keeps_room=self.keeps_room,
        )

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> Batch:
        """Stack batches row-wise, left-padding the narrower ones to the widest."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.width for b in batches)
        num_layers = len(batches[0].keys)
        rows = sum(len(b) for b in batches)
        # Right-aligned, each batch's room stays after its last column: the most any of them reserved.
        keeps_room = any(b.keeps_room for b in batches)
        room = max(HEADROOM_COLUMNS, *(b.room for b in batches)) if keeps_room else HEADROOM_COLUMNS
        keys, values = [], []
        for layer in range(num_layers):
            first = batches[0].keys[layer]  # [B, H_kv, C, d]
            k = allocate(rows, first.shape[1], width, first.shape[3], like=first, room=room)
            v = torch.zeros_like(k)
            offset = 0
            for b in batches:  # right-aligned: each batch's T columns end at the new width
                k[offset : offset + len(b), :, width - b.width : width] = b.keys[layer][:, :, : b.width]
                v[offset : offset + len(b), :, width - b.width : width] = b.values[layer][:, :, : b.width]
                offset += len(b)
            keys.append(k)
            values.append(v)
        for b in batches:
            b.keys, b.values = [], []
        masks = [torch.nn.functional.pad(b.attention_mask, (width - b.width, 0)) for b in batches]
        return cls(
            rows=[row for b in batches for row in b.rows],
            keys=keys,
            values=values,
            attention_mask=torch.cat(masks),
            next_positions=torch.cat([b.next_positions for b in batches]),
            next_input_ids=torch.cat([b.next_input_ids for b in batches]),
            sampling=SamplingBatch.concatenate([b.sampling for b in batches]),
            keeps_room=keeps_room,
        )

    def check(self) -> None:
        """Raise AssertionError if the batch is inconsistent. Cheap enough for tests, not for every step."""
        n, width = len(self.rows), self.width
        assert len({r.request_id for r in self.rows}) == n, "duplicate request ids"
        assert self.attention_mask.shape == (n, width)
        for k, v in zip(self.keys, self.values, strict=True):
            assert k.shape[0] == n and k.shape[2] >= width, f"key buffer {tuple(k.shape)} vs {n} rows x {width}"
            assert v.shape == k.shape
        for t in (self.next_positions, self.next_input_ids, *self.sampling._fields()):
            assert t.shape == (n,)
        real = self.attention_mask.sum(dim=1)
        assert torch.equal(real, self.next_positions), "real columns must equal next position per row"
        prefix_lens = torch.tensor([r.prefix_len for r in self.rows], device=real.device)
        assert bool((real > prefix_lens).all()), "every row holds its prefix plus at least one token"
