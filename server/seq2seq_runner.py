"""The model runner for encoder-decoder models (BART, T5): PEFT's seq2seq prefix-tuning, batched across prefixes.

Where PEFT's forward puts the prefix (peft 0.21.2, verified by
tests/test_seq2seq.py against it): in every decoder layer's self-attention
cache, before the decoder start token. Its cross-attention cache is reset, so
cross-attention sees only the encoder output, and the encoder runs on the
prompt alone. Decoder tokens take positions P, P + 1, ... (BART's learned
decoder positions count the cache; T5's relative bias is the distance between
columns, which left padding before a row's contiguous real columns preserves).

A prefill encodes the new prompts (right-padded), then runs the decoder start
token after each row's prefix; cross-attention keys and values are computed
once there and reused by every decode step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from server.batch import Batch, NewRequest
from server.cpu_linear import use_onednn_linear
from server.device_cache import DEFAULT_DEVICE_CACHE_BYTES, DevicePrefixCache
from server.kv_cache import build_cache, read_cache
from server.sampling import sample
from server.seq2seq_batch import Seq2SeqBatch


class _RowPositions:
    """Per-row positions for a decoder whose learned position embedding transformers indexes by cache column.

    BART's decoder looks positions up as ``cache length + i``, one vector for the whole batch; in a padded
    batch a row's position is P_i + tokens before it instead. A forward hook replaces the embedding's output
    with the lookup at the rows' own positions (the same table rows, so the result is exact).
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        self._positions: torch.Tensor | None = None  # [B, q] while the runner's forward is in flight
        embedding.register_forward_hook(self._replace)

    def _replace(self, module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        if self._positions is None:  # someone else's forward (e.g. probing the model at load)
            return output
        offset = int(getattr(module, "offset", 0))  # BART's table starts 2 rows in
        return nn.functional.embedding(self._positions + offset, module.weight)  # [B, q, D]

    @contextmanager
    def use(self, positions: torch.Tensor) -> Iterator[None]:
        self._positions = positions
        try:
            yield
        finally:
            self._positions = None


def _row_positions_for(model: PreTrainedModel) -> _RowPositions | None:
    """The position hook, for decoders with a learned position table (BART); None where positions are relative."""
    embedding = getattr(model.get_decoder(), "embed_positions", None)
    return _RowPositions(embedding) if isinstance(embedding, nn.Embedding) else None


class _FixedLayer(DynamicLayer):
    """A cross-attention cache layer holding keys/values computed at prefill; the model only reads it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # [B, H, S, d]
        self.device = keys.device
        self.is_initialized = True


def _right_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Token ids [B, S] and mask [B, S], each prompt at columns 0..n-1."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), length, dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.int64)
        mask[i, : len(prompt)] = 1
    return ids.to(device), mask.to(device)


class Seq2SeqRunner:
    """Executes prefill and decode steps of an encoder-decoder model. Called from the engine thread only."""

    fuses_prefill = False  # prompts go to the encoder in a prefill of their own, never in chunks
    scores_prompts = False  # the encoder reads the prompt: no logits predict its tokens

    def __init__(
        self,
        model: PreTrainedModel,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES,
        onednn_linear: bool = True,
    ) -> None:
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])  # V, the logits' width
        self.device = next(model.parameters()).device  # read before linear weights may become placeholders
        self.dtype = next(model.parameters()).dtype
        if onednn_linear:  # float32 on the CPU: packed oneDNN linear layers, held once (server/cpu_linear.py)
            use_onednn_linear(model, free_dense=True)
        self.prefix_cache = DevicePrefixCache(self.device, self.dtype, device_cache_bytes)
        self.kv_shape = (num_layers, num_kv_heads, head_dim)  # the decoder's self-attention
        config = model.config
        # What every decoder row starts from: the start token, then the token generation forces first, if the
        # model has one (BART's summarisation checkpoints: <s>, as transformers' generate() forces it, and as
        # training saw it: labels "<s> ... </s>" shifted right give decoder inputs "</s> <s> ..."). The forced
        # token is the row's decoder prompt, never a generated token.
        forced = getattr(model.generation_config, "forced_bos_token_id", None)
        self.decoder_prompt = (int(config.decoder_start_token_id), *(() if forced is None else (int(forced),)))
        pad = config.pad_token_id
        self.pad_id = int(pad) if isinstance(pad, int) else 0  # encoder padding is masked; any id will do
        self._positions = _row_positions_for(model)

    def on_idle(self) -> None:
        """Nothing running: nothing to release (decode steps hold no state between batches)."""

    def detokenizer_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """What precedes the generated tokens: the decoder's start (and forced) token, not the encoder's prompt."""
        return list(self.decoder_prompt)

    @torch.inference_mode()
    def prefill(self, requests: Sequence[NewRequest]) -> tuple[Seq2SeqBatch, torch.Tensor]:
        """Encode new prompts and run each row's decoder prompt after its prefix. Returns first tokens [B]."""
        batch, logits = self.prefill_logits(requests)
        return batch, self._sample(batch, logits)

    @torch.inference_mode()
    def decode(self, batch: Seq2SeqBatch) -> torch.Tensor:
        """One decoder step for every row, reusing the cross-attention keys/values. Returns tokens [B]."""
        return self._sample(batch, self.decode_logits(batch))

    @torch.inference_mode()
    def prefill_logits(self, requests: Sequence[NewRequest]) -> tuple[Seq2SeqBatch, torch.Tensor]:
        """The new rows' batch and their first logits [B, V] (float32); nothing sampled yet."""
        # Every decoder row's "prompt" is the same start tokens, so no row has padding inside its real columns.
        starts = [replace(r, prompt_ids=self.decoder_prompt) for r in requests]
        decoder, inputs = Batch.from_requests(
            starts,
            kv_shape=self.kv_shape,
            dtype=self.dtype,
            device=self.device,
            place_prefix=lambda r: self.prefix_cache.get(r.prefix_id, r.prefix_kv),
        )
        encoder_ids, encoder_mask = _right_padded([r.prompt_ids for r in requests], self.pad_id, self.device)
        encoded = self.model.get_encoder()(input_ids=encoder_ids, attention_mask=encoder_mask)
        # An empty cross-attention cache: the model computes and stores each layer's keys/values from the encoder.
        cache = EncoderDecoderCache(build_cache(decoder.keys, decoder.values, decoder.width), DynamicCache())
        logits = self._forward(
            encoded.last_hidden_state, encoder_mask, inputs.input_ids, inputs.attention_mask, inputs.position_ids, cache
        )
        decoder.keys, decoder.values = read_cache(cache.self_attention_cache)
        decoder.attention_mask = inputs.attention_mask
        decoder.next_positions = inputs.position_ids[:, -1] + 1
        cross = cache.cross_attention_cache.layers
        batch = Seq2SeqBatch(
            decoder=decoder,
            cross_keys=[layer.keys for layer in cross],
            cross_values=[layer.values for layer in cross],
            encoder_mask=encoder_mask,
        )
        return batch, logits

    @torch.inference_mode()
    def decode_logits(self, batch: Seq2SeqBatch) -> torch.Tensor:
        """Run every row's next input token; its logits [B, V] (float32). The caller sets the next inputs."""
        decoder = batch.decoder
        step = torch.ones(len(batch), 1, dtype=decoder.attention_mask.dtype, device=self.device)
        mask = torch.cat([decoder.attention_mask, step], dim=1)  # [B, T + 1]
        self_attention = build_cache(decoder.keys, decoder.values, decoder.width)
        cross = Cache(layers=[_FixedLayer(k, v) for k, v in zip(batch.cross_keys, batch.cross_values, strict=True)])
        cache = EncoderDecoderCache(self_attention, cross)  # cross layers non-empty: read, never recomputed
        # The encoder states only switch cross-attention on (its keys/values come from the cache): a zero-cost
        # stand-in of the right shape [B, S, D].
        hidden = self.model.config.get_text_config().d_model
        stand_in = torch.zeros((), dtype=self.dtype, device=self.device).expand(*batch.encoder_mask.shape, hidden)
        logits = self._forward(
            stand_in, batch.encoder_mask, decoder.next_input_ids[:, None], mask, decoder.next_positions[:, None], cache
        )
        decoder.keys, decoder.values = read_cache(self_attention)
        decoder.attention_mask = mask
        decoder.next_positions = decoder.next_positions + 1
        return logits

    def _forward(
        self,
        encoder_states: torch.Tensor,  # [B, S, D]
        encoder_mask: torch.Tensor,  # [B, S]
        decoder_input_ids: torch.Tensor,  # [B, q]
        decoder_mask: torch.Tensor,  # [B, T + q]
        positions: torch.Tensor,  # [B, q] each row's decoder positions
        cache: EncoderDecoderCache,
    ) -> torch.Tensor:
        """Last-position logits [B, V] (float32); the decoder's self-attention cache grows by q in place."""
        with self._positions.use(positions) if self._positions is not None else nullcontext():
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                attention_mask=encoder_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_mask,
                cache=cache,
                use_cache=True,
            )
        return out.logits[:, -1, :].float()

    @staticmethod
    def _sample(batch: Seq2SeqBatch, logits: torch.Tensor) -> torch.Tensor:
        tokens = sample(logits, batch.sampling)
        batch.decoder.next_input_ids = tokens
        return tokens
