"""The model runner: owns the frozen model and every tensor; runs prefill and decode steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from server.architectures import mask_builder
from server.batch import Batch, RowInfo
from server.device_cache import DEFAULT_DEVICE_CACHE_BYTES, DevicePrefixCache
from server.kv_cache import HEADROOM_COLUMNS, build_cache, read_cache
from server.sampling import SamplingBatch, SamplingParams, sample


@dataclass(frozen=True)
class NewRequest:
    """What the runner needs to start a row."""

    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams
    prefix_kv: torch.Tensor | None = None  # [L, 2, H_kv, P, d], any device/dtype
    prefix_id: str | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[3]


class ModelRunner:
    """Executes what the scheduler decided. Called from the engine thread only."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefix_cache = DevicePrefixCache(self.device, self.dtype, device_cache_bytes)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Sliding-window models need masks built from positions, not cache columns (see server/architectures.py).
        self._attention_mask = mask_builder(model.config, self.dtype)

    @torch.inference_mode()
    def prefill(self, requests: Sequence[NewRequest]) -> tuple[Batch, torch.Tensor]:
        """Run new requests' prompts together, each after its own prefix. Returns the batch and first tokens [B]."""
        batch, logits = self._prefill_forward(requests)
        tokens = sample(logits, batch.sampling)
        batch.next_input_ids = tokens
        return batch, tokens

    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """One decode step for every row; appends each row's input token to its KV. Returns tokens [B]."""
        step_mask = torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype, device=self.device)
        mask = torch.cat([batch.attention_mask, step_mask], dim=1)  # [B, T + 1]
        logits, batch.keys, batch.values = self._forward(
            batch.next_input_ids[:, None], mask, batch.next_positions[:, None], batch.keys, batch.values
        )
        batch.attention_mask = mask
        batch.next_positions = batch.next_positions + 1
        tokens = sample(logits, batch.sampling)
        batch.next_input_ids = tokens
        return tokens

    def _prefill_forward(self, requests: Sequence[NewRequest]) -> tuple[Batch, torch.Tensor]:
        n_rows = len(requests)
        prefix_lens = [r.prefix_len for r in requests]
        prompt_lens = [len(r.prompt_ids) for r in requests]
        p_max, n_max = max(prefix_lens), max(prompt_lens)
        dev = self.device

        # Past KV = the prefixes, left-padded to P_max, in buffers with room for the prompts and the first
        # decode steps: per layer [B, H_kv, P_max + N_max + headroom, d].
        capacity = p_max + n_max + HEADROOM_COLUMNS
        past = torch.zeros(
            self.num_layers, 2, n_rows, self.num_kv_heads, capacity, self.head_dim, dtype=self.dtype, device=dev
        )
        # Inputs = the prompts, left-padded to N_max. Mask over [prefix slots | prompt slots].
        input_ids = torch.zeros(n_rows, n_max, dtype=torch.int64)
        positions = torch.zeros(n_rows, n_max, dtype=torch.int64)
        mask = torch.zeros(n_rows, p_max + n_max, dtype=torch.int64)
        for i, req in enumerate(requests):
            p, n = prefix_lens[i], prompt_lens[i]
            if req.prefix_kv is not None:
                past[:, :, i, :, p_max - p : p_max] = self.prefix_cache.get(req.prefix_id, req.prefix_kv)
            input_ids[i, n_max - n :] = torch.tensor(list(req.prompt_ids), dtype=torch.int64)
            positions[i, n_max - n :] = torch.arange(p, p + n)
            mask[i, p_max - p : p_max] = 1
            mask[i, p_max + n_max - n :] = 1
        mask = mask.to(dev)
        keys = [past[layer, 0] for layer in range(self.num_layers)]
        values = [past[layer, 1] for layer in range(self.num_layers)]
        logits, keys, values = self._forward(input_ids.to(dev), mask, positions.to(dev), keys, values)
        batch = Batch(
            rows=[RowInfo(r.request_id, r.prefix_id, r.prefix_len) for r in requests],
            keys=keys,
            values=values,
            attention_mask=mask,
            next_positions=torch.tensor([p + n for p, n in zip(prefix_lens, prompt_lens, strict=True)], device=dev),
            next_input_ids=torch.zeros(n_rows, dtype=torch.int64, device=dev),
            sampling=SamplingBatch.from_params([r.params for r in requests], dev),
        )
        return batch, logits

    def _forward(
        self,
        input_ids: torch.Tensor,  # [B, q]
        attention_mask: torch.Tensor,  # [B, T + q]
        position_ids: torch.Tensor,  # [B, q]
        keys: list[torch.Tensor],  # per layer [B, H_kv, C, d] buffers, the first T columns in use
        values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Logits of each row's last input [B, V] (float32) and the buffers, now holding T + q columns."""
        past_len = attention_mask.shape[1] - input_ids.shape[1]
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._attention_mask(attention_mask, position_ids),
            position_ids=position_ids,
            cache=build_cache(keys, values, past_len),
            use_cache=True,
            logits_to_keep=1,
        )
        new_keys, new_values = read_cache(out.cache)
        return out.logits[:, -1, :].float(), new_keys, new_values
