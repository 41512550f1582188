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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.kv_cache import allocate
from server.sampling import SamplingBatch


@dataclass(frozen=True)
class RowInfo:
    """Who a row belongs to. Rebuilt only by indexing lists of these, never field by field."""

    request_id: str
    prefix_id: str | None  # "tenant/task@version", or None for the base model
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

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """T, the padded KV length shared by all rows."""
        return self.attention_mask.shape[1]

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.rows]

    def filter(self, keep_request_ids: Sequence[str]) -> Batch | None:
        """Keep the given requests (in their current order); trim columns that are padding in every kept row."""
        wanted = set(keep_request_ids)
        keep = [i for i, row in enumerate(self.rows) if row.request_id in wanted]
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
        self.keys, self.values = [], []
        return Batch(
            rows=[self.rows[i] for i in keep],
            keys=keys,
            values=values,
            attention_mask=mask,
            next_positions=self.next_positions[index],
            next_input_ids=self.next_input_ids[index],
            sampling=self.sampling.filter(index),
        )

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> Batch:
        """Stack batches row-wise, left-padding the narrower ones to the widest."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.width for b in batches)
        num_layers = len(batches[0].keys)
        rows = sum(len(b) for b in batches)
        keys, values = [], []
        for layer in range(num_layers):
            first = batches[0].keys[layer]  # [B, H_kv, C, d]
            k = allocate(rows, first.shape[1], width, first.shape[3], like=first)
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
