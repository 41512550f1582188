"""Vectorised per-row sampling.

One call samples the next token for every row of the batch. Each row carries
its own parameters as tensors that filter and concatenate with the batch:

1. greedy rows (temperature == 0) take the argmax of the raw logits;
2. the other rows divide logits by their temperature and turn them into
   probabilities;
3. min-p, then top-k and top-p (only when some row asks for them) zero each
   row's tail: min-p below a share of the likeliest token's probability (vLLM's
   ``min_p``), top-k / top-p found on the sorted distribution;
4. one uniform number per row, drawn from a counter-based hash of the row's
   seed and step, picks a token by inverse-CDF search.

Step 4 makes a seeded request reproducible whatever its batch-mates: a row's
random number depends only on (seed, step), never on the batch, the device or
a shared generator's state.

Before step 1, rows may adjust their logits (``LogitAdjustments``), as vLLM does: penalise
tokens they have seen (the repetition penalty, HF/TGI's, on every token of the prompt or
generated so far, then the frequency and presence penalties, OpenAI's, on generated ones)
and add a fixed bias to chosen tokens (OpenAI's ``logit_bias``).

Then rows held to a grammar (``GrammarRows``, server/structured_output.py: a JSON schema, a regex, a choice)
get -inf on every token their grammar does not allow next.

Rows may also ask for log-probabilities (OpenAI's ``logprobs``): the sampled
token's and the k most likely tokens', under the model's own distribution
(log-softmax of the raw logits, before temperature, top-k or top-p: vLLM's
default), so they do not depend on how the token was picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from server.structured_output import DraftMasks, Grammar, GrammarRows

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler and the stopping rules."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    # vLLM's min_p: tokens less likely than min_p times the likeliest one (after temperature) are not sampled.
    min_p: float = 0.0  # 0 = off
    seed: int = 0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the text stays in it
    skip_special_tokens: bool = True  # special tokens (EOS, chat markers) leave no text, as in vLLM by default
    ignore_eos: bool = False  # vLLM's name: EOS does not end the request (fixed-length runs)
    # None: no log-probabilities; k (0..config.MAX_LOGPROBS): the sampled token's and the k most likely tokens'.
    logprobs: int | None = None
    # The same for each prompt token after the first (vLLM's ``prompt_logprobs``): how likely the model found the
    # prompt, given the prefix and the tokens before it. None: not computed.
    prompt_logprobs: int | None = None
    # Penalties on tokens already seen and biases (``LogitAdjustments``): 1.0 / 0.0 / () = off.
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt or generated so far
    frequency_penalty: float = 0.0  # subtracted from a generated token's logit once per time it was generated
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), as OpenAI's logit_bias
    # Tokens that end the request as EOS does (finish reason "stop"; vLLM's stop_token_ids), ignore_eos or not.
    stop_token_ids: tuple[int, ...] = ()
    # vLLM's min_tokens: before this many tokens, the ``held_back`` tokens cannot be sampled. The engine fills
    # ``held_back`` with the tokens that would end the request: EOS (unless ignore_eos) and stop_token_ids.
    min_tokens: int = 0
    held_back: tuple[int, ...] = ()
    # Structured output: what the text must match, compiled (the API compiles the client's spec off the engine
    # thread). None: unconstrained.
    grammar: Grammar | None = field(default=None, compare=False)

    @property
    def adjusts_logits(self) -> bool:
        penalized = self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        return penalized or bool(self.logit_bias) or self.holds_back

    @property
    def holds_back(self) -> bool:
        return self.min_tokens > 0 and bool(self.held_back)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the most likely alternatives', as a row asked for them."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class StepLogprobs:
    """Log-probabilities of one sampling call, on the logits' device (read on the host once the step is done)."""

    chosen: torch.Tensor  # [B] float32: each row's sampled token
    top_ids: torch.Tensor  # [B, K] int64: the K most likely tokens, K = the most any row asked for
    top_values: torch.Tensor  # [B, K] float32

    def rows(self) -> list[tuple[float, list[int], list[float]]]:
        """Per row: (chosen, top ids, top log-probabilities), all K of them."""
        return list(zip(self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist(), strict=True))


@dataclass
class LogitAdjustments:
    """The penalties and biases of the rows of a batch that ask for any, and what each of those rows has seen.

    Applied to the logits before sampling, in vLLM's order: a row's repetition penalty r divides each positive
    logit and multiplies each negative one of every token in its prompt or generated so far; then its frequency
    penalty times the token's count and its presence penalty (once) come off every token it generated; then its
    logit bias is added; and until it has generated ``min_tokens`` tokens, its ``held_back`` tokens get -inf.
    Greedy rows are adjusted too. Log-probabilities stay those of the raw logits.

    Only the P rows that ask hold state, [P, V] tensors made by the first ``apply`` (which knows V) and kept
    ready to use: the repetition penalty as two scales (for positive and negative logits: 1 where a token is not
    seen), the rest as one additive offset. ``record`` updates the one column per row that a step's token
    changes, so ``apply`` is a few elementwise passes (2-core CPU, 32 rows, V = 49152: one row asking costs a
    step ~0.1 ms, every row with every penalty ~0.5 ms).
    """

    rows: tuple[int, ...]  # on the host: the P rows of the batch that ask
    index: torch.Tensor  # [P] int64: the same, on the batch's device
    repetition: torch.Tensor  # [P] float32, 1 = off
    frequency: torch.Tensor  # [P] float32, 0 = off
    presence: torch.Tensor  # [P] float32, 0 = off
    repetitions: tuple[float, ...]  # on the host: the P rows' repetition penalties
    prompts: list[Sequence[int]] | None  # the P rows' prompts, until the first ``apply``
    biases: list[tuple[tuple[int, float], ...]] | None  # the P rows' logit biases, until the first ``apply``
    holds: tuple[tuple[int, tuple[int, ...]], ...]  # on the host, per row: (min_tokens, held-back token ids)
    offset: torch.Tensor | None = None  # [P, V] float32: bias - frequency x count - presence x (count > 0)
    positive_scale: torch.Tensor | None = None  # [P, V] float32: 1 / r where the token was seen, else 1
    negative_scale: torch.Tensor | None = None  # [P, V] float32: r where the token was seen, else 1
    generated: torch.Tensor | None = None  # [P, V] bool: generated by the row so far
    # Two [P, V] buffers ``apply`` computes in, kept: fresh [B, V] temporaries every step page-faulted here (glibc
    # hands big blocks back to the kernel), which made a 32-row step's adjustments ~8 ms instead of ~0.5.
    _scratch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # ``holds`` flattened for the device: (row, token, min_tokens) of every held-back token; made when needed.
    _held: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], device: torch.device
    ) -> LogitAdjustments | None:
        """The adjustments of the rows that ask; None when none does (sampling then pays nothing for them)."""
        rows = [i for i, p in enumerate(params) if p.adjusts_logits]
        if not rows:
            return None

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(params[i], name) for i in rows], dtype=torch.float32, device=device)

        return cls(
            rows=tuple(rows),
            index=torch.tensor(rows, dtype=torch.int64, device=device),
            repetition=column("repetition_penalty"),
            frequency=column("frequency_penalty"),
            presence=column("presence_penalty"),
            repetitions=tuple(params[i].repetition_penalty for i in rows),
            prompts=[prompts[i] for i in rows],
            biases=[params[i].logit_bias for i in rows],
            holds=tuple((params[i].min_tokens, params[i].held_back if params[i].holds_back else ()) for i in rows),
        )

    def _state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.offset is not None and self.positive_scale is not None
        assert self.negative_scale is not None and self.generated is not None
        return self.offset, self.positive_scale, self.negative_scale, self.generated

    @property
    def vocab(self) -> int | None:
        return None if self.offset is None else self.offset.shape[1]

    def materialize(self, vocab: int) -> None:
        """Make the [P, V] state: nothing generated yet, each row's prompt tokens seen, its biases in place."""
        if self.offset is not None:
            return
        assert self.prompts is not None and self.biases is not None
        device = self.index.device
        rows = len(self.rows)
        self.offset = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.positive_scale = torch.ones(rows, vocab, dtype=torch.float32, device=device)
        self.negative_scale = torch.ones(rows, vocab, dtype=torch.float32, device=device)
        self.generated = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        row_ids = [i for i, prompt in enumerate(self.prompts) for _ in prompt]
        if row_ids:  # one copy to the device for all prompts
            token_ids = [token for prompt in self.prompts for token in prompt]
            where = torch.tensor([row_ids, token_ids], dtype=torch.int64).to(device)
            self.positive_scale[where[0], where[1]] = 1.0 / self.repetition[where[0]]
            self.negative_scale[where[0], where[1]] = self.repetition[where[0]]
        biased = [(i, token, value) for i, bias in enumerate(self.biases) for token, value in bias]
        if biased:
            bias_rows, tokens, values = zip(*biased, strict=True)
            where = torch.tensor([bias_rows, tokens], dtype=torch.int64).to(device)
            self.offset[where[0], where[1]] = torch.tensor(values, dtype=torch.float32).to(device)
        self.prompts = self.biases = None

    def apply(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] (float32) with the asking rows adjusted (``logits`` is untouched); ``step`` [B] is
        how many tokens each row has generated."""
        self.materialize(logits.shape[-1])
        offset, positive_scale, negative_scale, _ = self._state()
        # Every row, in order (filters may reorder them): no gather, no scatter.
        every_row = len(self.rows) == logits.shape[0] and self.rows == tuple(range(len(self.rows)))
        x = logits if every_row else logits[self.index]  # [P, V]
        if self._scratch is None or self._scratch[0].shape != x.shape:
            self._scratch = (torch.empty_like(x), torch.empty_like(x))
        out, spare = self._scratch
        if any(r != 1.0 for r in self.repetitions):
            # x / r for positive logits, x * r for negative ones, without torch.where (~25x slower here than
            # these): for r >= 1 that is the smaller of x / r and x * r (both have x's sign), for r < 1 the larger.
            torch.mul(x, positive_scale, out=out)
            torch.mul(x, negative_scale, out=spare)
            if all(r >= 1.0 for r in self.repetitions):
                torch.minimum(out, spare, out=out)
            else:  # rows that encourage repeats take the larger: -min(-a, -b)
                sign = torch.where(self.repetition >= 1.0, 1.0, -1.0)[:, None]
                torch.minimum(out.mul_(sign), spare.mul_(sign), out=out).mul_(sign)
            out.add_(offset)
        else:
            torch.add(x, offset, out=out)
        if any(held for _, held in self.holds):
            rows, tokens, minimum = self._held_back(out.device)
            too_early = step[self.index][rows] < minimum  # [H]: the row has generated fewer than its min_tokens
            out[rows, tokens] = torch.where(too_early, -torch.inf, out[rows, tokens])
        # ``out`` is overwritten by the next call: the caller samples from it before then.
        return out if every_row else logits.index_copy(0, self.index, out)

    def _held_back(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per held-back token: its row among the P, its id, and the row's min_tokens ([H] int64 each)."""
        if self._held is None:
            flat = [(row, token, minimum) for row, (minimum, held) in enumerate(self.holds) for token in held]
            rows, tokens, minimums = torch.tensor(flat, dtype=torch.int64).to(device).unbind(1)
            self._held = rows, tokens, minimums
        return self._held

    def record(self, tokens: torch.Tensor) -> None:
        """The batch's rows generated ``tokens`` [B]: update the column of each asking row's token."""
        offset, positive_scale, negative_scale, generated = self._state()
        mine = tokens[self.index]
        rows = torch.arange(len(self.rows), device=tokens.device)
        first = ~generated[rows, mine]
        generated[rows, mine] = True
        offset[rows, mine] -= self.frequency + self.presence * first
        positive_scale[rows, mine] = 1.0 / self.repetition
        negative_scale[rows, mine] = self.repetition

    def filter(self, kept_rows: Sequence[int]) -> LogitAdjustments | None:
        """The adjustments of the batch that keeps ``kept_rows`` (in that order); None when no asking row stays."""
        new_position = {row: i for i, row in enumerate(kept_rows)}
        picked = [(j, new_position[row]) for j, row in enumerate(self.rows) if row in new_position]
        if not picked:
            return None  # the rows that asked have left: the rest sample without any of this work
        device = self.index.device
        select = torch.tensor([j for j, _ in picked], dtype=torch.int64, device=device)
        rows = [row for _, row in picked]
        out = LogitAdjustments(
            rows=tuple(rows),
            index=torch.tensor(rows, dtype=torch.int64, device=device),
            repetition=self.repetition[select],
            frequency=self.frequency[select],
            presence=self.presence[select],
            repetitions=tuple(self.repetitions[j] for j, _ in picked),
            prompts=None if self.prompts is None else [self.prompts[j] for j, _ in picked],
            biases=None if self.biases is None else [self.biases[j] for j, _ in picked],
            holds=tuple(self.holds[j] for j, _ in picked),
        )
        if self.offset is not None:
            out.offset, out.positive_scale, out.negative_scale, out.generated = (t[select] for t in self._state())
        return out

    @classmethod
    def concatenate(cls, parts: Sequence[tuple[LogitAdjustments | None, int]]) -> LogitAdjustments | None:
        """The adjustments of batches of the given sizes stacked row-wise (None: a batch without any)."""
        present: list[tuple[LogitAdjustments, int]] = []
        offset = 0
        for adjustments, size in parts:
            if adjustments is not None:
                present.append((adjustments, offset))
            offset += size
        if not present:
            return None
        # Made by an earlier ``apply`` in some part: the others make theirs now, the same size.
        vocab = next((p.vocab for p, _ in present if p.vocab is not None), None)
        if vocab is not None:
            for p, _ in present:
                p.materialize(vocab)
        pieces = [p for p, _ in present]
        out = cls(
            rows=tuple(row + shift for p, shift in present for row in p.rows),
            index=torch.cat([p.index + shift for p, shift in present]),
            repetition=torch.cat([p.repetition for p in pieces]),
            frequency=torch.cat([p.frequency for p in pieces]),
            presence=torch.cat([p.presence for p in pieces]),
            repetitions=tuple(r for p in pieces for r in p.repetitions),
            prompts=None if vocab is not None else [prompt for p in pieces for prompt in p.prompts or []],
            biases=None if vocab is not None else [bias for p in pieces for bias in p.biases or []],
            holds=tuple(hold for p in pieces for hold in p.holds),
        )
        if vocab is not None:
            states = [p._state() for p in pieces]
            out.offset, out.positive_scale, out.negative_scale, out.generated = (
                torch.cat(list(column)) for column in zip(*states, strict=True)
            )
        return out


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, aligned with the rows of a batch."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    seed: torch.Tensor  # [B] int64
    step: torch.Tensor  # [B] int64, tokens sampled so far for the row
    min_p: torch.Tensor  # [B] float32, 0 = off
    # Known on the host: False when every row is greedy, so ``sample`` needs no host sync to find out. True may
    # also mean "not known" (rows filtered out since): ``sample`` then checks on the device.
    may_sample: bool = True
    # Likewise: False when no row asks for min-p, so sampling rows need no device check for it.
    may_min_p: bool = True
    # On the host, per row: the alternatives it asks for, -1 = no log-probabilities.
    logprobs_asked: tuple[int, ...] = ()
    # Set by every ``sample`` call: that call's log-probabilities, or None when no row asked for them.
    last_logprobs: StepLogprobs | None = None
    adjustments: LogitAdjustments | None = None  # None when no row asks for a penalty or a bias
    # None when no row is held to a grammar; a speculative step's copy holds its queries' masks (``at_positions``).
    grammars: GrammarRows | DraftMasks | None = None

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        device: torch.device,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> SamplingBatch:
        """The rows' sampling; ``prompts`` (the tokens a row has seen before its first sample) matter only to
        rows with a repetition penalty."""
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            seed=torch.tensor([p.seed & ((1 << 63) - 1) for p in params], dtype=torch.int64, device=device),
            step=torch.zeros(len(params), dtype=torch.int64, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            may_sample=any(p.temperature > 0 for p in params),
            may_min_p=any(p.min_p > 0 for p in params),
            logprobs_asked=tuple(-1 if p.logprobs is None else p.logprobs for p in params),
            adjustments=LogitAdjustments.of(params, prompts or [()] * len(params), device),
            grammars=GrammarRows.of([p.grammar for p in params]),
        )

    def filter(self, keep: torch.Tensor, kept_rows: Sequence[int]) -> SamplingBatch:
        """The rows ``kept_rows`` (on the host), ``keep`` being the same as a tensor on the batch's device."""
        return SamplingBatch(
            *(t[keep] for t in self._fields()),
            may_sample=self.may_sample,
            may_min_p=self.may_min_p,
            logprobs_asked=tuple(self.logprobs_asked[i] for i in kept_rows),
            adjustments=None if self.adjustments is None else self.adjustments.filter(kept_rows),
            grammars=None if self.grammars is None else self.grammars.filter(kept_rows),
        )

    @classmethod
    def concatenate(cls, batches: Sequence[SamplingBatch]) -> SamplingBatch:
        columns = zip(*(b._fields() for b in batches), strict=True)
        return cls(
            *(torch.cat(list(c)) for c in columns),
            may_sample=any(b.may_sample for b in batches),
            may_min_p=any(b.may_min_p for b in batches),
            logprobs_asked=tuple(asked for b in batches for asked in b.logprobs_asked),
            adjustments=LogitAdjustments.concatenate([(b.adjustments, len(b)) for b in batches]),
            grammars=GrammarRows.concatenate([(b.grammars, len(b)) for b in batches]),
        )

    def at_positions(
        self, counts: Sequence[int], drafts: Sequence[Sequence[int]] = (), vocab: int = 0
    ) -> SamplingBatch:
        """Each row's sampling repeated for its next ``counts[r]`` tokens, row after row ([sum n_r] fields), the
        i-th copy at the row's step + i: a speculative step samples every position of a row as the row would
        sample its tokens one step at a time. Rows held to a grammar get the mask of its state after their
        ``drafts`` before each position (``vocab``: the logits' width); the step then moves the matchers past
        the tokens the rows keep (``GrammarRows.advance``). Not for rows with log-probabilities or adjustments
        (penalties and biases follow the tokens one by one)."""
        if self.max_logprobs >= 0 or self.adjustments is not None:
            raise ValueError("rows with log-probabilities, penalties or biases sample one token at a time")
        grammars = self.grammars
        assert not isinstance(grammars, DraftMasks)  # a speculative step's copy is not copied again
        per_row = torch.tensor(counts, device=self.step.device)
        within = torch.cat([torch.arange(n) for n in counts]).to(self.step.device)  # position i of its row
        return SamplingBatch(
            temperature=self.temperature.repeat_interleave(per_row),
            top_k=self.top_k.repeat_interleave(per_row),
            top_p=self.top_p.repeat_interleave(per_row),
            seed=self.seed.repeat_interleave(per_row),
            step=self.step.repeat_interleave(per_row) + within,
            min_p=self.min_p.repeat_interleave(per_row),
            may_sample=self.may_sample,
            may_min_p=self.may_min_p,
            grammars=None if grammars is None else grammars.at_positions(drafts, counts, vocab),
        )

    @property
    def max_logprobs(self) -> int:
        """The most alternatives any row asks for; -1 when no row asks for log-probabilities."""
        return max(self.logprobs_asked, default=-1)

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.temperature, self.top_k, self.top_p, self.seed, self.step, self.min_p)

    def __len__(self) -> int:
        return self.temperature.shape[0]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x holding uint32 values in int64, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (murmur3 fmix32): every input bit flips ~half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniforms(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, a pure function of (seed, step). [B] -> [B]."""
    seed_lo = seed & _MASK32
    seed_hi = (seed >> 32) & _MASK32
    base = _mix32(seed_lo ^ _mix32((seed_hi + _mul32(step & _MASK32, 0x9E3779B9)) & _MASK32))
    high = _mix32(base ^ 0x5BD1E995)  # 32 bits
    low = _mix32((base + 0x27D4EB2F) & _MASK32) >> 11  # 21 bits
    return ((high << 21) | low).to(torch.float64) * 2.0**-53


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Next token per row. logits: [B, V] -> tokens: [B] int64. Advances ``params.step`` and sets
    ``params.last_logprobs``."""
    logits = logits.float()
    adjustments, grammars, k = params.adjustments, params.grammars, params.max_logprobs
    adjusted = logits if adjustments is None else adjustments.apply(logits, params.step)
    if grammars is not None:
        if adjusted is logits and k >= 0:  # the mask goes in place: the log-probabilities are the raw logits'
            adjusted = logits.clone()
        grammars.mask(adjusted)
    tokens = _pick(adjusted, params)
    if adjustments is not None:
        adjustments.record(tokens)
    if grammars is not None:
        grammars.accept(tokens)
    params.last_logprobs = None if k < 0 else step_logprobs(logits, tokens, k)  # the raw logits' (vLLM's default)
    return tokens


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> StepLogprobs:
    """The sampled tokens' log-probabilities and the k most likely tokens' per row. logits: [B, V] float32."""
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, V]
    top = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)  # sorted, most likely first
    chosen = log_probs.gather(1, tokens[:, None]).squeeze(1)
    return StepLogprobs(_json_safe(chosen), top.indices, _json_safe(top.values))


# What a log-probability of -inf (or NaN, from logits a broken prefix made non-finite) is reported as: JSON has no
# infinities, and vLLM reports -inf as this.
LOGPROB_FLOOR = -9999.0


def _json_safe(log_probs: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(log_probs, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)


def prompt_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Log-probabilities of prompt tokens: ``logits`` [n, V] at n prompt positions, ``targets`` [n] the token that
    follows each (the prompt's next one). Each target's log-probability and the k most likely tokens' (host)."""
    step = step_logprobs(logits.float(), targets.to(logits.device), k)
    return [TokenLogprob(chosen, tuple(zip(ids, values, strict=True))) for chosen, ids, values in step.rows()]


def _distribution(logits: torch.Tensor, params: SamplingBatch, sampling_rows: torch.Tensor) -> torch.Tensor:
    """Each row's probabilities after temperature, min-p, top-k and top-p (unnormalised: zeros cut the tail).
    [B, V] -> [B, V]. A row's values never depend on what its batch-mates ask for."""
    temperature = torch.where(sampling_rows, params.temperature, torch.ones_like(params.temperature))
    probs = torch.softmax(logits / temperature[:, None], dim=-1)  # [B, V]
    if params.may_min_p and bool((params.min_p > 0).any()):  # before top-k / top-p, as vLLM applies it
        probs = probs.masked_fill(probs < params.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        # Top-p's mass is the kept tokens': rows with min_p renormalise; the others divide by exactly 1, as alone.
        kept_mass = torch.where(params.min_p > 0, probs.sum(dim=-1), torch.ones_like(params.min_p))
        probs = probs / kept_mass[:, None]
    if bool((params.top_k > 0).any()) or bool((params.top_p < 1).any()):
        probs = _truncate(probs, params.top_k, params.top_p)
    return probs


def _pick(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    greedy_tokens = logits.argmax(dim=-1)
    sampling_rows = params.temperature > 0
    # All greedy: known on the host without a sync when ``may_sample`` is False (on a GPU the host runs on ahead).
    if not params.may_sample or not bool(sampling_rows.any()):
        params.step += 1
        return greedy_tokens

    probs = _distribution(logits, params, sampling_rows)

    # The CDF runs in vocabulary order for every row, truncated or not, so a row's pick never
    # depends on which code path its batch-mates needed.
    cdf = probs.cumsum(dim=-1)  # [B, V], non-decreasing
    u = row_uniforms(params.seed, params.step).to(cdf.dtype) * cdf[:, -1]
    # First index whose cumulative mass exceeds u: always a token with non-zero probability.
    picked = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_max(cdf.shape[-1] - 1)
    params.step += 1
    return torch.where(sampling_rows, picked, greedy_tokens)


# The most likely tokens per row among which top-k / top-p heads are looked for first (``_truncate``).
TRUNCATION_CANDIDATES = 256


def _truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero each row's tokens outside its top-k / top-p head, in vocabulary order. [B, V] -> [B, V].

    The head is found on the distribution in descending order; its smallest probability becomes a per-row
    threshold applied to the unsorted one (rows without top-k/top-p keep everything). Sorting all V
    probabilities took ~2 ms a row (V = 49152, 2-core CPU): at 32 rows as long as the decode step. So the head is
    looked for among the ``TRUNCATION_CANDIDATES`` most likely tokens first (``topk``: 0.06 ms a row). Where it
    ends among them it is the same head as on the whole sorted row (the kept prefix and the sums before it are
    the same); only rows whose head takes every candidate are sorted whole.
    """
    vocab = probs.shape[-1]
    candidates = min(vocab, TRUNCATION_CANDIDATES)
    head = probs.topk(candidates, dim=-1).values  # [B, candidates], descending
    kept = _sorted_head_mask(head, top_k, top_p).sum(dim=-1)  # [B], >= 1
    threshold = head.gather(1, (kept - 1)[:, None])  # [B, 1]
    wide = kept == candidates  # the head may go on past the candidates
    if candidates < vocab and bool(wide.any()):
        rows = wide.nonzero().squeeze(1)
        sorted_probs = probs[rows].sort(dim=-1, descending=True).values
        kept = _sorted_head_mask(sorted_probs, top_k[rows], top_p[rows]).sum(dim=-1)
        threshold[rows] = sorted_probs.gather(1, (kept - 1)[:, None])
    return probs.masked_fill(probs < threshold, 0.0)


def _sorted_head_mask(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token of each row's descending distribution is kept. [B, V] -> [B, V] bool."""
    vocab = sorted_probs.shape[-1]
    rank = torch.arange(vocab, device=sorted_probs.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    outside_k = rank >= k[:, None]
    # Keep the smallest head whose mass reaches top_p: a token goes when the mass before it already does.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside_p = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    outside_p[:, 0] = False  # the most likely token always stays
    return ~(outside_k | outside_p)
