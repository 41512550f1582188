"""The model runner: owns the frozen model and every tensor; runs prefill and decode steps."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from server.architectures import mask_builder, sliding_window_of
from server.attention import ATTENTION_NAME, use_gqa_attention
from server.batch import Batch, NewRequest, PrefillInputs
from server.cpu_linear import onednn_available, use_onednn_linear
from server.decode_attention import supported as decode_attention_supported
from server.device_cache import DEFAULT_DEVICE_CACHE_BYTES, DevicePrefixCache
from server.fused_projections import fuse_projections as fuse_layer_projections
from server.fused_projections import use_onednn_for_fused
from server.fused_step import LAYOUT_KWARG, ChunkSlot, DecodeSlot, FusedLayout, placeholder_mask
from server.kv_cache import build_cache, read_cache, with_room
from server.sampling import SamplingParams, TokenLogprob, prompt_token_logprobs, sample
from server.speculative import accepted
from server.static_decode import StaticDecoder
from server.structured_output import GrammarRows

__all__ = ["ModelRunner", "NewRequest", "PendingPrefill"]  # NewRequest lives with the batch; re-exported here

# Prompt tokens (rows x longest prompt) one prefill forward takes on a CPU; a larger prefill is split by rows.
# Default model, 32 prompts of 512 tokens: one forward 33.2 s, forwards of 8 rows 27.5 s, of 4 rows 23.9 s.
CPU_PREFILL_FORWARD_TOKENS = 2048
# A group is compacted after a speculative step once padding between its rows' real columns exceeds a quarter of
# its width and this many columns (a compaction copies the group's KV).
MIN_COMPACTED_COLUMNS = 16


@dataclass
class PendingPrefill:
    """A new row whose prompt enters its KV chunk by chunk, inside decode steps (server/fused_step.py)."""

    batch: Batch  # one row: its prefix, then the prompt tokens prefilled so far (a single row needs no padding)
    inputs: PrefillInputs  # the whole prompt: input_ids, position_ids [1, N]; attention_mask [1, P + N]
    done: int = 0  # prompt tokens already in the KV
    # The request's ``prompt_logprobs`` (None: not asked), and those of the prompt tokens so far: one per token
    # in the KV, the first None (nothing before it predicts it).
    prompt_logprobs_asked: int | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.inputs.input_ids.shape[1] - self.done


class ModelRunner:
    """Executes what the scheduler decided. Called from the engine thread only."""

    scores_prompts = True  # prompt log-probabilities: the decoder reads the prompt, so its logits predict it

    def __init__(
        self,
        model: PreTrainedModel,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES,
        static_decode: bool | None = None,
        compile_decode: bool = False,
        onednn_linear: bool = True,
        fuse_projections: bool | None = None,
        decode_kernel: bool = True,
        reserve_decode: bool | None = None,
    ) -> None:
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])  # V, the logits' width
        # Also here, not only at load: runners built on bare models (tests, benchmarks) serve like load_model's.
        use_gqa_attention(model)
        self.device = next(model.parameters()).device  # read before linear weights may become placeholders
        self.dtype = next(model.parameters()).dtype
        # One matmul for q/k/v and one for gate/up (server/fused_projections.py), first, while the weights are
        # dense: on CUDA, where a decode step's small matmuls are bound by latency, not bytes; on the CPU where
        # the matmuls run on oneDNN (stacked, they take 0.62-0.84x the time: bench/RESULTS.md). torch's default
        # CPU kernel gains nothing from it.
        if fuse_projections is None:
            fuse_projections = self.device.type == "cuda" or (
                onednn_linear and onednn_available() and self.device.type == "cpu" and self.dtype == torch.float32
            )
        if fuse_projections:
            fuse_layer_projections(model)
        if onednn_linear:  # the runner picks the kernels it serves with; the loader leaves the model as shipped
            # float32 on the CPU: packed oneDNN linear layers, held once (server/cpu_linear.py). A compiled step
            # traces through F.linear on the dense weights, so those stay.
            use_onednn_linear(model, free_dense=not compile_decode)
            use_onednn_for_fused(model, free_dense=not compile_decode)
        self.prefix_cache = DevicePrefixCache(self.device, self.dtype, device_cache_bytes)
        # The last separate prefill's prompt log-probabilities, by request id (only requests that asked).
        self.last_prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Sliding-window models need masks built from positions, not cache columns (see server/architectures.py).
        self._attention_mask = mask_builder(model.config, self.dtype)
        # Chunks of prompts can ride along in decode steps when attention is ours and needs no position masks.
        self.fuses_prefill = (
            model.config._attn_implementation == ATTENTION_NAME and sliding_window_of(model.config) is None
        )
        # Decode steps without prompt chunks (one batch, or KV groups) at fixed shapes, replayed from CUDA graphs
        # (server/static_decode.py): by default on CUDA, where the eager step is host-bound. Needs our attention,
        # as fused steps do.
        if static_decode is None:
            static_decode = self.device.type == "cuda"
        if self.device.type == "cuda":
            # cuDNN's SDPA builds an execution plan for every new shape (tens of ms each), and an eager decode
            # step's KV grows by a column every step: on an H200, eager steps that hit it took 60-80 ms instead
            # of ~15 (bench/RESULTS.md, "GPU"). Flash / memory-efficient attention need no plans. Process-wide.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # Their attention by a Triton kernel that reads each row's KV only up to the step's column
        # (server/decode_attention.py), where it serves the shapes (CUDA); else SDPA over every column.
        heads = getattr(model.config, "num_attention_heads", None)
        kernel = (
            decode_kernel
            and heads is not None
            and decode_attention_supported(self.device, heads, num_kv_heads, head_dim)
        )
        self.static_decoder = (
            StaticDecoder(model, use_graphs=self.device.type == "cuda", compile_forward=compile_decode, kernel=kernel)
            if static_decode and self.fuses_prefill
            else None
        )
        # KV buffers reserve every decode step their rows may take (Batch.from_requests), by default where the
        # kernel leaves free columns unread: there a growth costs a copy, eager steps and a new graph, and room
        # costs only memory. SDPA (elsewhere) would read every reserved column each step.
        if reserve_decode is None:
            reserve_decode = self.static_decoder is not None and self.static_decoder.kernel
        self.reserve_decode = reserve_decode

    @torch.inference_mode()
    def compile_decode_steps(self, max_groups: int) -> None:
        """Run the compiled fixed-shape step once for 1..max_groups groups of dummy rows, so that its compiles
        (one per number of groups) happen now and not under traffic.

        Sizes that are equal when dynamo first sees them get one symbol, and a later call where they differ
        compiles again; so every group here has its own number of rows and its own width (never 1, never equal
        to a KV-head count or head size), and the graphs hold for any sizes.
        """
        if self.static_decoder is None or not self.static_decoder.compiled:
            return
        params = SamplingParams(max_new_tokens=2)
        first = max(1, self.num_kv_heads, self.head_dim) + 1  # above every size the buffers fix
        rows = [first + i for i in range(max_groups)]  # each group's rows, then its prompt length: all distinct
        prompts = [first + max_groups + i for i in range(max_groups)]
        groups = [
            self.prefill([NewRequest(f"compile-{i}-{j}", [0] * prompts[i], params) for j in range(rows[i])])[0]
            for i in range(max_groups)
        ]
        for n in range(1, max_groups + 1):
            self._static_decode(groups[:n])
        self.on_idle()

    def on_idle(self) -> None:
        """Nothing running: let go of the last batch's fixed-shape step (its graph and KV buffers)."""
        if self.static_decoder is not None:
            self.static_decoder.release()

    def detokenizer_context(self, prompt_ids: Sequence[int]) -> Sequence[int]:
        """What precedes the generated tokens in the model's context: the prompt."""
        return prompt_ids

    @torch.inference_mode()
    def prefill(self, requests: Sequence[NewRequest]) -> tuple[Batch, torch.Tensor]:
        """Run new requests' prompts together, each after its own prefix. Returns the batch and first tokens [B].
        The prompt log-probabilities of the requests that asked are in ``last_prompt_logprobs`` afterwards."""
        batch, logits = self._prefill_forward(requests)
        tokens = sample(logits, batch.sampling)
        batch.next_input_ids = tokens
        return batch, tokens

    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """One decode step for every row; appends each row's input token to its KV. Returns tokens [B]."""
        if self.static_decoder is not None:
            (tokens,) = self._static_decode([batch])
            return tokens
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

    @torch.inference_mode()
    def begin_prefill(self, request: NewRequest) -> PendingPrefill:
        """A one-row batch holding the request's prefix; ``fused_step`` feeds it the prompt in chunks."""
        asked = request.params.prompt_logprobs
        return PendingPrefill(*self._new_rows([request]), prompt_logprobs_asked=asked, prompt_logprobs=[None])

    @torch.inference_mode()
    def fused_step(
        self, groups: Sequence[Batch], chunks: Sequence[tuple[PendingPrefill, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """One forward pass: a decode step for every row of ``groups`` plus the next n prompt tokens of each chunk.

        ``groups`` are the running rows as padded batches of their own (server/kv_groups.py). Returns each
        group's tokens [B_g] and, per chunk, the row's first token [1] when the chunk completes its prompt (None
        otherwise). Requires ``fuses_prefill``. A chunk whose request asked for prompt log-probabilities adds
        its tokens' to ``PendingPrefill.prompt_logprobs``.
        """
        if not chunks and self.static_decoder is not None:
            return self._static_decode(groups), []
        logits = self._fused_forward(groups, chunks)
        tokens = _sample_groups(groups, logits)
        rows = sum(len(batch) for batch in groups)  # the chunks' rows follow the groups' rows (_kept_rows)
        firsts: list[torch.Tensor | None] = []
        for pending, n in chunks:
            kept = logits[rows : rows + _kept_rows(pending, n, finishes=not pending.remaining)]
            rows += len(kept)
            if pending.prompt_logprobs_asked is not None:
                # Row i predicts the prompt token after the chunk's i-th; a finished prompt's last row predicts
                # the first generated token instead, which sampling reports.
                start = pending.done - n
                scored = n if pending.remaining else n - 1
                targets = pending.inputs.input_ids[0, start + 1 : start + 1 + scored]
                pending.prompt_logprobs += prompt_token_logprobs(kept[:scored], targets, pending.prompt_logprobs_asked)
            if pending.remaining:
                firsts.append(None)
                continue
            first = pending.batch.next_input_ids = sample(kept[-1:], pending.batch.sampling)
            firsts.append(first)
        return tokens, firsts

    @torch.inference_mode()
    def speculative_step(self, groups: Sequence[Batch], drafts: Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
        """One forward verifying each row's draft tokens (server/speculative.py): the tokens each row yields.

        ``drafts`` holds, per group and row, the tokens proposed after the row's input token (possibly none).
        No row has log-probabilities, penalties or biases (``speculates``); a row held to a grammar samples each
        query under the mask of its grammar after the drafts before it. Each row feeds its input token and its
        drafts, n_r tokens (attention lays a group's out in q_g = 1 + the most drafts of its rows slots per row;
        a group without drafts decodes as in a plain step). At
        each query the row samples as it would have at that step (greedy, or its seeded draw for that step);
        row r keeps its input token and the a_r drafts that equal the tokens sampled before them, and yields
        those a_r drafts and the token sampled after them: the tokens it would have had one step at a time.
        A group's width grows by 1 + the most drafts any of its rows accepted; a row that accepted fewer has the
        rest of those columns as padding (the rejected drafts' K/V, masked), and columns beyond the width are
        free room again. Requires ``fuses_prefill``.
        """
        counts = [[1 + len(d) for d in group_drafts] for group_drafts in drafts]  # n_r per group and row
        token_ids, positions, decodes = [], [], []
        for batch, group_drafts, group_counts in zip(groups, drafts, counts, strict=True):
            q = max(group_counts)
            if q == 1:  # no drafts in this group: its plain decode step
                decodes.append(_decode_slot(batch))
                token_ids.append(batch.next_input_ids)
                positions.append(batch.next_positions)
                continue
            batch.keys = [with_room(k, batch.width, batch.width + q) for k in batch.keys]
            batch.values = [with_room(v, batch.width, batch.width + q) for v in batch.values]
            # Row r feeds n_r = 1 + its drafts tokens: its input token, then its drafts, at its next positions.
            within = torch.cat([torch.arange(n) for n in group_counts]).to(self.device)  # [sum n_r]: query i
            per_row = torch.tensor(group_counts, device=self.device)
            inputs = batch.next_input_ids.repeat_interleave(per_row)
            drafted = [token for d in group_drafts for token in d]
            if drafted:
                inputs[within > 0] = torch.tensor(drafted, dtype=torch.int64, device=self.device)
            token_ids.append(inputs)
            positions.append(batch.next_positions.repeat_interleave(per_row) + within)
            rows, width = len(batch), batch.width
            seen = batch.attention_mask.bool()[:, None, None, :].expand(rows, 1, q, width)
            causal = torch.ones(q, q, dtype=torch.bool, device=self.device).tril().expand(rows, 1, q, q)
            mask = torch.cat([seen, causal], dim=-1)
            # The real queries' places in the group's [B_g·q] attention layout (None: every row has q).
            real = None
            if min(group_counts) < q:
                real = torch.arange(rows, device=self.device).repeat_interleave(per_row) * q + within
            decodes.append(DecodeSlot(batch.keys, batch.values, width, mask, q, real))
        out = self.model(
            input_ids=torch.cat(token_ids)[None],
            position_ids=torch.cat(positions)[None],
            attention_mask=placeholder_mask(self.device),
            use_cache=False,
            **{LAYOUT_KWARG: FusedLayout(decodes, [])},
        )
        logits = out.logits[0].float()  # [sum n_r, V], row after row
        # The token each query's row would sample there (greedy, or its seeded draw at that step): n_r per row.
        targets: list[list[int]] = []
        start = 0
        for batch, group_drafts, group_counts in zip(groups, drafts, counts, strict=True):
            end = start + sum(group_counts)
            sampling = batch.sampling.at_positions(group_counts, group_drafts, logits.shape[-1])
            tokens = sample(logits[start:end], sampling).tolist()
            starts = itertools.accumulate([0, *group_counts])
            targets += [tokens[a : a + n] for a, n in zip(starts, group_counts, strict=False)]
            start = end
        yielded: list[list[int]] = []
        for batch, group_drafts in zip(groups, drafts, strict=True):
            group_targets, targets = targets[: len(batch)], targets[len(batch) :]
            kept = [accepted(d, t) for d, t in zip(group_drafts, group_targets, strict=True)]  # a_r
            grown = 1 + max(kept)
            real = torch.arange(grown)[None, :] <= torch.tensor(kept)[:, None]  # [B_g, grown]
            batch.attention_mask = torch.cat([batch.attention_mask, real.to(batch.attention_mask)], dim=1)
            advance = torch.tensor([a + 1 for a in kept], dtype=torch.int64, device=self.device)
            batch.next_positions = batch.next_positions + advance
            batch.sampling.step += advance
            rows = [t[: a + 1] for t, a in zip(group_targets, kept, strict=True)]
            if isinstance(batch.sampling.grammars, GrammarRows):
                batch.sampling.grammars.advance(rows)
            batch.next_input_ids = torch.tensor([r[-1] for r in rows], dtype=torch.int64, device=self.device)
            # Each step widens the group by its best row's tokens, so rows that accept less gather padding: the
            # KV would outgrow what admission reserved for the rows (their real lengths). Squeezed out once it is
            # a quarter of the width.
            if batch.inner_padding > max(MIN_COMPACTED_COLUMNS, batch.width // 4):
                batch.compact()
            yielded += rows
        return yielded

    @torch.inference_mode()
    def prompt_kv(self, batch: Batch, row: int, start: int, end: int) -> torch.Tensor:
        """The K/V of prompt tokens [start, end) of ``row``, a row whose whole prompt has just gone into its KV:
        [L, 2, H_kv, end - start, d], a copy (for the prompt cache). The row's real columns are its prefix,
        then its prompt, in order."""
        real = torch.nonzero(batch.attention_mask[row]).flatten()  # [P + N]
        first = int(real[batch.rows[row].prefix_len + start])
        if int(real[batch.rows[row].prefix_len + end - 1]) != first + end - start - 1:
            raise RuntimeError("a prompt's columns are not contiguous in its row")
        return torch.stack(
            [
                torch.stack([k[row, :, first : first + end - start], v[row, :, first : first + end - start]])
                for k, v in zip(batch.keys, batch.values, strict=True)
            ]
        )

    def _static_decode(self, groups: Sequence[Batch]) -> list[torch.Tensor]:
        """A decode step of fixed shape for the rows of ``groups`` (a CUDA graph on a GPU); each group's tokens."""
        assert self.static_decoder is not None
        logits = self.static_decoder.logits(groups)
        for batch in groups:
            _advance_past_decode(batch)
        return _sample_groups(groups, logits)

    def _fused_forward(self, groups: Sequence[Batch], chunks: Sequence[tuple[PendingPrefill, int]]) -> torch.Tensor:
        """The forward of ``fused_step``: logits [B + completed prompts, V] (float32), in the order of the step."""
        token_ids: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        decodes: list[DecodeSlot] = []
        for batch in groups:
            decodes.append(_decode_slot(batch))
            token_ids.append(batch.next_input_ids)
            positions.append(batch.next_positions)
        # Flat indices whose logits are wanted: every decode token, then per chunk ``_kept_rows`` of its tokens
        # (the last ones): a finished prompt's last, or all of them where prompt log-probabilities are asked.
        keep = list(range(sum(len(batch) for batch in groups)))
        slots = []
        offset = len(keep)
        for pending, n in chunks:
            if not 0 < n <= pending.remaining:
                raise ValueError(f"a chunk of {n} tokens for a prompt with {pending.remaining} left")
            done = pending.done
            token_ids.append(pending.inputs.input_ids[0, done : done + n])
            positions.append(pending.inputs.position_ids[0, done : done + n])
            slots.append(ChunkSlot(pending.batch.keys, pending.batch.values, pending.batch.width, n))
            offset += n
            keep.extend(range(offset - _kept_rows(pending, n, finishes=n == pending.remaining), offset))
        out = self.model(
            input_ids=torch.cat(token_ids)[None],
            position_ids=torch.cat(positions)[None],
            attention_mask=placeholder_mask(self.device),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.int64, device=self.device),
            **{LAYOUT_KWARG: FusedLayout(decodes, slots)},
        )
        # The K/V of every token are in place now: advance each row's bookkeeping past them.
        for batch in groups:
            _advance_past_decode(batch)
        for pending, n in chunks:
            pending.done += n
            context = pending.inputs.attention_mask.shape[1] - pending.inputs.input_ids.shape[1]  # prefix + cached
            pending.batch.attention_mask = pending.inputs.attention_mask[:, : context + pending.done]
            if not pending.remaining:
                pending.batch.next_positions = pending.inputs.position_ids[:, -1] + 1
        return out.logits[0].float()

    def _prefill_forward(self, requests: Sequence[NewRequest]) -> tuple[Batch, torch.Tensor]:
        """The prompts' forward after their prefixes: the batch holding all of it, and last-token logits [B, V].

        On a CPU, a prefill of many rows runs as several forwards of at most ``CPU_PREFILL_FORWARD_TOKENS`` prompt
        tokens, each on a slice of rows writing its slice of the batch's buffers. Rows never meet in a forward,
        so the result is the same; the smaller forwards' activations stay in cache.

        A request that asked for prompt log-probabilities gets a forward of its own, which keeps every position's
        logits ([1, N, V] in float32: N x V x 4 bytes, 400 MB for 2,048 tokens of the default model's vocabulary;
        the other rows never pay for them); its log-probabilities go to ``last_prompt_logprobs`` (by request id).
        """
        batch, inputs = self._new_rows(requests)
        rows, width = inputs.input_ids.shape
        step = rows if self.device.type != "cpu" else max(1, CPU_PREFILL_FORWARD_TOKENS // width)
        logits = []
        self.last_prompt_logprobs = {}
        for part in _prefill_parts(requests, step):
            asking = [(i, r) for i, r in enumerate(requests[part]) if r.params.prompt_logprobs is not None]
            part_logits, keys, _ = self._forward(
                inputs.input_ids[part],
                inputs.attention_mask[part],
                inputs.position_ids[part],
                [k[part] for k in batch.keys],  # views: the forward writes into the batch's buffers
                [v[part] for v in batch.values],
                every_position=bool(asking),
            )
            # The buffers have room for the prompts (Batch.from_requests): no layer grew into a new tensor.
            if keys[0].data_ptr() != batch.keys[0][part].data_ptr():
                raise RuntimeError("a prefill outgrew the KV buffers made for it")
            for i, request in asking:
                # Prompts are left-padded: this one's N tokens are the last N columns, and the logits at its
                # first N - 1 predict its tokens 2..N.
                n = len(request.prompt_ids)
                targets = torch.as_tensor(list(request.prompt_ids[1:]), dtype=torch.int64)
                scored = prompt_token_logprobs(
                    part_logits[i, width - n : width - 1], targets, request.params.prompt_logprobs
                )
                self.last_prompt_logprobs[request.request_id] = [None, *scored]
            logits.append(part_logits[:, -1] if asking else part_logits)
        batch.attention_mask = inputs.attention_mask
        batch.next_positions = inputs.position_ids[:, -1] + 1  # every row's last prompt token is in the last column
        return batch, logits[0] if len(logits) == 1 else torch.cat(logits)

    def _new_rows(self, requests: Sequence[NewRequest]) -> tuple[Batch, PrefillInputs]:
        """Rows holding the requests' prefixes (from the device tier of the prefix cache), and their prompt inputs."""
        return Batch.from_requests(
            requests,
            kv_shape=(self.num_layers, self.num_kv_heads, self.head_dim),
            dtype=self.dtype,
            device=self.device,
            place_prefix=lambda r: self.prefix_cache.get(r.prefix_id, r.prefix_kv),
            reserve_decode=self.reserve_decode,
        )

    def _forward(
        self,
        input_ids: torch.Tensor,  # [B, q]
        attention_mask: torch.Tensor,  # [B, T + q]
        position_ids: torch.Tensor,  # [B, q]
        keys: list[torch.Tensor],  # per layer [B, H_kv, C, d] buffers, the first T columns in use
        values: list[torch.Tensor],
        every_position: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Logits (float32) of each row's last input [B, V], or of all its inputs [B, q, V] with
        ``every_position``; and the buffers, now holding T + q columns."""
        past_len = attention_mask.shape[1] - input_ids.shape[1]
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._attention_mask(attention_mask, position_ids),
            position_ids=position_ids,
            cache=build_cache(keys, values, past_len),
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
        )
        new_keys, new_values = read_cache(out.cache)
        logits = out.logits if every_position else out.logits[:, -1, :]
        return logits.float(), new_keys, new_values


def _prefill_parts(requests: Sequence[NewRequest], step: int) -> list[slice]:
    """The rows of a separate prefill cut into forwards of at most ``step`` rows, in order; a request that asked
    for prompt log-probabilities alone in its own."""
    parts: list[slice] = []
    start = 0
    for i, request in enumerate(requests):
        if request.params.prompt_logprobs is not None:
            parts += [slice(s, min(s + step, i)) for s in range(start, i, step)]
            parts.append(slice(i, i + 1))
            start = i + 1
    return parts + [slice(s, min(s + step, len(requests))) for s in range(start, len(requests), step)]


def _kept_rows(pending: PendingPrefill, n: int, *, finishes: bool) -> int:
    """Logit rows a chunk of n tokens keeps in a fused step (its last ones): all n where the request asked for
    prompt log-probabilities, else the last where the chunk finishes the prompt (its first token), else none."""
    if pending.prompt_logprobs_asked is not None:
        return n
    return 1 if finishes else 0


def _decode_slot(batch: Batch) -> DecodeSlot:
    """Where a group's rows write and read in a plain decode step: column T, after the rows' real columns."""
    batch.make_room_for_step()
    mask = torch.nn.functional.pad(batch.attention_mask.bool(), (0, 1), value=True)[:, None, None]
    return DecodeSlot(batch.keys, batch.values, batch.width, mask)


def _advance_past_decode(batch: Batch) -> None:
    """Bookkeeping after a decode step wrote every row's input token at column T: one more real column each."""
    batch.attention_mask = torch.nn.functional.pad(batch.attention_mask, (0, 1), value=1)
    batch.next_positions = batch.next_positions + 1


def _sample_groups(groups: Sequence[Batch], logits: torch.Tensor) -> list[torch.Tensor]:
    """Each group's next tokens [B_g] from its rows of ``logits`` (the groups' rows first, in order); each group
    also keeps its tokens as its next inputs."""
    tokens = []
    rows = 0
    for batch in groups:
        batch.next_input_ids = sample(logits[rows : rows + len(batch)], batch.sampling)
        tokens.append(batch.next_input_ids)
        rows += len(batch)
    return tokens
