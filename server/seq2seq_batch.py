"""The running batch of an encoder-decoder model: the decoder's padded KV plus each row's encoder output.

PEFT's encoder-decoder prefix-tuning (``num_transformer_submodules: 2``) puts
the prefix in the decoder's self-attention cache only: its forward resets the
cross-attention cache, so cross-attention sees the encoder output and nothing
else, and the encoder gets no prefix. So the decoder side is exactly the
decoder-only layout of server/batch.py (a row is [padding | prefix | decoder
start token | generated tokens], positions P, P + 1, ... on its tokens), and
the encoder side adds, per decoder layer, the cross-attention keys and values
computed once at prefill:

* ``cross_keys[l]`` / ``cross_values[l]``: [B, H, S, d], rows right-padded to
  the longest prompt S (right, so the encoder saw each prompt at positions
  0..n-1 exactly as alone: BART's encoder positions are column indices);
* ``encoder_mask``: [B, S] int64, 1 over each row's prompt tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from server.batch import Batch, RowInfo
from server.sampling import SamplingBatch


@dataclass
class Seq2SeqBatch:
    decoder: Batch  # the decoder's self-attention KV, mask, positions, next inputs and sampling
    cross_keys: list[torch.Tensor]  # per decoder layer [B, H, S, d]
    cross_values: list[torch.Tensor]  # per decoder layer [B, H, S, d]
    encoder_mask: torch.Tensor  # [B, S] int64

    # The engine reads these, the same as on a decoder-only Batch.
    def __len__(self) -> int:
        return len(self.decoder)

    @property
    def rows(self) -> list[RowInfo]:
        return self.decoder.rows

    @property
    def request_ids(self) -> list[str]:
        return self.decoder.request_ids

    @property
    def width(self) -> int:
        """The decoder's padded self-attention length (the part that grows)."""
        return self.decoder.width

    @property
    def next_positions(self) -> torch.Tensor:
        return self.decoder.next_positions

    @property
    def next_input_ids(self) -> torch.Tensor:
        return self.decoder.next_input_ids

    @property
    def sampling(self) -> SamplingBatch:
        return self.decoder.sampling

    def drop(self, leaving_request_ids: Collection[str]) -> Seq2SeqBatch | None:
        """The batch without the given requests' rows (``filter``: cross-attention KV has no in-place path)."""
        leaving = set(leaving_request_ids)
        return self.filter([r for r in self.request_ids if r not in leaving])

    def filter(self, keep_request_ids: Sequence[str]) -> Seq2SeqBatch | None:
        """Keep the given requests; drop encoder columns that are padding in every kept row."""
        keep = self.decoder.indices_of(keep_request_ids)
        decoder = self.decoder.filter(keep_request_ids)
        if decoder is None:
            return None
        if decoder is self.decoder:
            return self
        index = torch.tensor(keep, dtype=torch.int64, device=self.encoder_mask.device)
        mask = self.encoder_mask[index]
        length = int(mask.sum(dim=1).max())  # right-padded: the longest kept prompt ends here
        return Seq2SeqBatch(
            decoder=decoder,
            cross_keys=[k.index_select(0, index)[:, :, :length] for k in self.cross_keys],
            cross_values=[v.index_select(0, index)[:, :, :length] for v in self.cross_values],
            encoder_mask=mask[:, :length],
        )

    @classmethod
    def concatenate(cls, batches: Sequence[Seq2SeqBatch]) -> Seq2SeqBatch:
        """Stack row-wise: the decoders as Batch does (left-padded), encoder outputs right-padded to the longest."""
        if len(batches) == 1:
            return batches[0]
        length = max(b.encoder_mask.shape[1] for b in batches)

        def right_padded(tensors: list[torch.Tensor]) -> torch.Tensor:  # each [B_i, H, S_i, d]
            return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2])) for t in tensors])

        num_layers = len(batches[0].cross_keys)
        return cls(
            decoder=Batch.concatenate([b.decoder for b in batches]),
            cross_keys=[right_padded([b.cross_keys[layer] for b in batches]) for layer in range(num_layers)],
            cross_values=[right_padded([b.cross_values[layer] for b in batches]) for layer in range(num_layers)],
            encoder_mask=torch.cat(
                [torch.nn.functional.pad(b.encoder_mask, (0, length - b.encoder_mask.shape[1])) for b in batches]
            ),
        )

    def check(self) -> None:
        """Raise AssertionError if the batch is inconsistent (tests call it after every operation)."""
        self.decoder.check()
        n, length = self.encoder_mask.shape
        assert n == len(self.decoder), "one encoder row per decoder row"
        real = self.encoder_mask.sum(dim=1)
        assert bool((real > 0).all()), "every row has a prompt"
        # Right padding: a row's prompt occupies its first `real` columns.
        columns = torch.arange(length, device=real.device)[None, :]
        assert torch.equal(self.encoder_mask.bool(), columns < real[:, None]), "encoder rows must be right-padded"
        for k, v in zip(self.cross_keys, self.cross_values, strict=True):
            assert k.shape[0] == n and k.shape[2] == length, f"cross keys {tuple(k.shape)} vs {n} rows x {length}"
            assert v.shape == k.shape
