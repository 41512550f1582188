"""The model runner: owns the frozen model and every tensor; runs prefill and decode steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from server.architectures import mask_builder
from server.attention import use_gqa_attention
from server.batch import Batch, NewRequest
from server.device_cache import DEFAULT_DEVICE_CACHE_BYTES, DevicePrefixCache
from server.kv_cache import build_cache, read_cache
from server.sampling import sample

__all__ = ["ModelRunner", "NewRequest"]  # NewRequest lives with the batch; callers import it from here too


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
        # Also here, not only at load: runners built on bare models (tests, benchmarks) serve like load_model's.
        use_gqa_attention(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefix_cache = DevicePrefixCache(self.device, self.dtype, device_cache_bytes)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Sliding-window models need masks built from positions, not cache columns (see server/architectures.py).
        self._attention_mask = mask_builder(model.config, self.dtype)

    def detokenizer_context(self, prompt_ids: Sequence[int]) -> Sequence[int]:
        """What precedes the generated tokens in the model's context: the prompt."""
        return prompt_ids

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
        """The prompts' forward after their prefixes: the batch holding all of it, and last-token logits [B, V]."""
        batch, inputs = Batch.from_requests(
            requests,
            kv_shape=(self.num_layers, self.num_kv_heads, self.head_dim),
            dtype=self.dtype,
            device=self.device,
            place_prefix=lambda r: self.prefix_cache.get(r.prefix_id, r.prefix_kv),
        )
        logits, batch.keys, batch.values = self._forward(
            inputs.input_ids, inputs.attention_mask, inputs.position_ids, batch.keys, batch.values
        )
        batch.attention_mask = inputs.attention_mask
        batch.next_positions = inputs.position_ids[:, -1] + 1  # every row's last prompt token is in the last column
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
