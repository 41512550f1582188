"""The engine: one thread that owns the model and runs iteration-level (continuous) batching.

The HTTP layer is async. It submits requests from the event loop; the engine
thread admits them between decode steps, prefills newcomers together, merges
them into the running batch and drops finished or cancelled rows. Each
request's events go back to its own asyncio queue via call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import queue
import secrets
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server import kv_groups
from server.batch import Batch, RowInfo
from server.config import MAX_LISTED_TOKENS, MAX_LOGIT_BIAS, MAX_LOGPROBS
from server.errors import ContextLengthExceeded, InvalidInput, Overloaded, Unavailable
from server.prefill_pacing import StepClock, paced_budget
from server.prompt_cache import CachedPrompt, PromptCache
from server.runner import ModelRunner, NewRequest, PendingPrefill
from server.sampling import SamplingParams, StepLogprobs, TokenLogprob
from server.scheduler import QueueFull, Running, Scheduler, SchedulerConfig
from server.speculative import RowSpeculation, SpeculativeConfig, TaskHistory, plan, speculates
from server.step_gaps import StepGaps
from server.text_stream import Decoder, IncrementalDetokenizer, StopMatcher
from server.threads import ENGINE_TORCH_THREADS, pin_torch_threads, release_openmp_pool

if TYPE_CHECKING:
    from server.metrics import EngineMetrics
    from server.seq2seq_runner import Seq2SeqRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    params: SamplingParams
    prefix_kv: torch.Tensor | None = None  # [L, 2, H_kv, P, d] on the host
    prefix_id: str | None = None  # identifies tenant, task and version; rows with equal ids share a prefix
    tenant: str = "default"  # whose request: admission is round-robin across tenants
    # The client's guess of the output's tokens (OpenAI's ``prediction``): drafts for speculative decoding, where
    # it runs; the output is the same with or without one.
    prediction: tuple[int, ...] = ()

    @property
    def prefix_len(self) -> int:
        """P, the prefix's virtual tokens (0 without a prefix)."""
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[3]


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a request: a token and the text it released, or the end."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's tokens, those whose K/V came from the prompt cache
    # With a prediction: its drafts that stood and that did not, so far (OpenAI's completion_tokens_details).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    error: str | None = None
    logprob: TokenLogprob | None = None  # when the request asked for log-probabilities
    # With the first token, when the request asked for prompt log-probabilities: one per prompt token, the
    # first None (nothing before it predicts it).
    prompt_logprobs: Sequence[TokenLogprob | None] | None = None


@dataclass
class _Tracked:
    """The engine's state of one request."""

    request_id: str
    request: GenerationRequest
    max_len: int  # KV slots the row may reach: P + prompt + max_new_tokens (within the context)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[GenerationEvent]
    detokenizer: IncrementalDetokenizer | None
    stop: StopMatcher
    generated: list[int] = field(default_factory=list)
    prompt_logprobs: Sequence[TokenLogprob | None] | None = None  # once the prompt is in, when asked for
    cached: CachedPrompt | None = None  # the prompt's head found in the prompt cache at admission
    speculation: RowSpeculation | None = None  # once the row may speculate (server/speculative.py)
    cancelled: bool = False
    done: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)  # for time to first token
    last_token_at: float = 0.0  # for inter-token latency


@dataclass
class _Prefilling:
    """An admitted request whose prompt is entering the KV chunk by chunk (fused chunked prefill)."""

    tracked: _Tracked
    # Its row (prefix copied in, room for the prompt): made when its first chunk is scheduled, so that a burst
    # admitted at once pays for its rows step by step, as its chunks go in, and no earlier.
    pending: PendingPrefill | None = None

    @property
    def remaining(self) -> int:
        """Prompt tokens not yet in the KV."""
        if self.pending is not None:
            return self.pending.remaining
        cached = self.tracked.cached
        return len(self.tracked.request.prompt_ids) - (0 if cached is None else cached.tokens)


# A chunk's cost beyond its tokens, in prompt tokens' worth of step time (2-core CPU, default model, 16 rows
# decoding: a prompt token adds ~1.1-1.35 ms to the step). Each chunk: ~2 ms of attention calls and indexing in
# every layer. A row's first chunk also makes the row: ~0.65 ms, and ~1.7 ms per 200 prefix columns (copied
# in, then attended over). Measured in bench/RESULTS.md, tenth session.
CHUNK_OVERHEAD_TOKENS = 2
ROW_START_TOKENS = 1
PREFIX_COLUMNS_PER_TOKEN = 100
# With prefill pacing, a step carries at least this fraction of the chunk budget: 16 of the default 64, the budget
# with which a burst of 16 newcomers kept 16 streams' inter-token latency p99 within 1.2x (RESULTS.md, S5).
PACING_FLOOR_DIVISOR = 4


def chunk_overhead(entry: _Prefilling) -> int:
    """The step time a chunk of ``entry``'s prompt costs beyond its tokens, in tokens."""
    if entry.pending is not None:
        return CHUNK_OVERHEAD_TOKENS
    cached = entry.tracked.cached
    columns = entry.tracked.request.prefix_len + (0 if cached is None else cached.tokens)  # copied into the row
    return CHUNK_OVERHEAD_TOKENS + ROW_START_TOKENS + columns // PREFIX_COLUMNS_PER_TOKEN


@dataclass
class _Launched:
    """A decode step's results on their way to the host: each group's rows as the step ran them, and one
    [2, B] int64 copy of every row's new token and next position (groups' rows in order), pinned on CUDA."""

    rows: list[list[RowInfo]]  # per group
    slots: int  # KV slots the forward covered: rows x width, summed over the groups
    host: torch.Tensor  # [2, B]: tokens, then next positions
    ready: torch.cuda.Event | None  # recorded after the copy (CUDA); None when ``host`` is already filled
    chunk_rows: Sequence[RowInfo] = ()  # prompt chunks in the same forward (batch metrics only)
    chunk_slots: int = 0  # their KV columns, none of them padding
    logprobs: Sequence[StepLogprobs | None] = ()  # per group, when some row of it asked for log-probabilities

    @classmethod
    def of(
        cls,
        groups: Sequence[Batch],
        tokens: Sequence[torch.Tensor],
        chunk_rows: Sequence[RowInfo] = (),
        chunk_slots: int = 0,
    ) -> _Launched:
        """Start copying the step's tokens and positions to the host without waiting for the step to finish."""
        packed = torch.cat([torch.stack((t, g.next_positions)) for g, t in zip(groups, tokens, strict=True)], dim=1)
        rows = [list(g.rows) for g in groups]
        slots = sum(len(g) * g.width for g in groups)
        # Each group's sampling call of this step set them (the next step's call replaces them: taken now).
        logprobs = [g.sampling.last_logprobs for g in groups]
        if packed.device.type != "cuda":
            return cls(rows, slots, packed, None, chunk_rows, chunk_slots, logprobs)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(rows, slots, host, ready, chunk_rows, chunk_slots, logprobs)

    def values(self) -> tuple[list[int], list[int]]:
        """Tokens and next positions (waits for this step's copy only, not for any step launched after it)."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, positions = self.host.tolist()
        return tokens, positions

    def row_logprobs(self) -> list[tuple[float, list[int], list[float]] | None]:
        """Per row (groups' rows in order): (sampled token's log-probability, top ids, top log-probabilities),
        or None where the row's group computed none. Call after ``values``: the step has finished."""
        out: list[tuple[float, list[int], list[float]] | None] = []
        for group_rows, step in zip(self.rows, self.logprobs or [None] * len(self.rows), strict=True):
            out += [None] * len(group_rows) if step is None else step.rows()
        return out


class Engine:
    def __init__(
        self,
        runner: ModelRunner | Seq2SeqRunner,
        tokenizer: Decoder | None,
        *,
        eos_token_ids: Sequence[int],
        max_context: int,
        config: SchedulerConfig | None = None,
        metrics: EngineMetrics | None = None,
        step_gaps: StepGaps | None = None,
        overlap_steps: bool | None = None,
        prompt_cache: PromptCache | None = None,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        """``step_gaps``, if given, runs other threads' CPU-bound work between steps (server/step_gaps.py).

        ``overlap_steps``: a decode step is launched before the last one's tokens are handed out, so the host's
        per-row work runs while the accelerator computes (None: on CUDA, for decoder-only runners). A row that
        ends (EOS, stop string, cancel) rides one step more; that step's token is dropped.

        ``prompt_cache``: prompt heads' K/V kept for later requests of the same prefix (server/prompt_cache.py);
        decoder-only runners only (an encoder-decoder's prompt goes to the encoder).

        ``speculative``: draft tokens by prompt lookup, verified in the decode step, while few rows decode
        (server/speculative.py); runners that fuse prefill only (the step's attention reads our layout).
        """
        self.runner = runner
        self.prompt_cache = prompt_cache if isinstance(runner, ModelRunner) else None
        speculating = speculative is not None and isinstance(runner, ModelRunner) and runner.fuses_prefill
        self.speculative = speculative if speculating and speculative is not None else SpeculativeConfig()
        # Each task's recent outputs, drafts for its later requests (server/speculative.py).
        self.task_history = TaskHistory(self.speculative) if self.speculative.enabled else None
        self.step_gaps = step_gaps
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.scheduler = Scheduler(config or SchedulerConfig())
        self._lock = threading.RLock()  # guards scheduler, _tracked and _accepting
        self._tracked: dict[str, _Tracked] = {}
        self._wakeup: queue.Queue[None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = False
        self._accepting = True
        # The running rows: one padded batch, or with fused steps up to ``kv_groups`` of them (server/kv_groups.py).
        self._groups: list[Batch] = []
        # Fused chunked prefill (runner permitting): admitted rows whose prompts are still going in, in order.
        self._chunk_tokens = self.scheduler.config.prefill_chunk_tokens if runner.fuses_prefill else 0
        self._max_groups = max(1, self.scheduler.config.kv_groups) if self._chunk_tokens else 1
        # Prefill pacing (server/prefill_pacing.py): chunks smaller than the budget while prompts have time.
        self._deadline_s = self.scheduler.config.prefill_deadline_s if self._chunk_tokens else 0.0
        self._step_clock = StepClock()
        self._prefilling: list[_Prefilling] = []
        self._ids = itertools.count()
        # Events of the current step, per event loop, sent together when the step ends (_flush_outbox): one
        # call_soon_threadsafe per row and step cost 16% of the engine thread at 128 rows of a tiny model.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Tracked, GenerationEvent]]] = {}
        self._engine_thread_id: int | None = None
        if overlap_steps is None:
            overlap_steps = isinstance(runner, ModelRunner) and runner.device.type == "cuda"
        self._overlap = overlap_steps
        self._ahead: _Launched | None = None  # the decode step launched last, its tokens not yet handed out
        # Called on the engine thread each time it goes idle (nothing running or waiting), before it sleeps: the
        # runner lets go of its last batch first; the server adds a heap trim.
        self.idle_hooks: list[Callable[[], None]] = [runner.on_idle]

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        release_openmp_pool()  # the engine thread's pool must be the process's only one (server/threads.py)
        self._thread = threading.Thread(target=self._loop, name="prefix-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting, let running requests finish (up to ``timeout``), then stop the thread."""
        with self._lock:
            self._accepting = False
        self._running = False
        self._wakeup.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def prefills_in_chunks(self) -> bool:
        """Whether prompts enter the batch in chunks inside decode steps (else in prefill forwards of their own)."""
        return self._chunk_tokens > 0

    @property
    def max_groups(self) -> int:
        """Padded groups the running rows may be kept in: ``kv_groups`` with fused steps, else one."""
        return self._max_groups

    @property
    def num_running(self) -> int:
        return sum(len(g) for g in self._groups) + len(self._prefilling)

    def _running_ids(self) -> list[str]:
        return [request_id for g in self._groups for request_id in g.request_ids]

    # ----- the async side ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Submit a request and yield its events; leaving early (disconnect) cancels it."""
        tracked = self._submit(request)
        try:
            while True:
                event = await tracked.events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not tracked.done:
                self.abort(tracked.request_id)

    def _submit(self, request: GenerationRequest) -> _Tracked:
        prefix_len = request.prefix_len
        used = prefix_len + len(request.prompt_ids)
        if not request.prompt_ids:
            raise InvalidInput("the prompt is empty", param="prompt")
        vocab = self.runner.vocab_size
        if any(not 0 <= token < vocab for token in request.prompt_ids):  # an embedding lookup would fail the step
            raise InvalidInput(f"prompt token ids must be between 0 and {vocab - 1}", param="prompt")
        request = dataclasses.replace(request, params=self._checked(request.params))
        max_len = used + request.params.max_new_tokens
        if max_len > self.max_context:
            raise ContextLengthExceeded(
                context=self.max_context,
                prompt_tokens=len(request.prompt_ids),
                prefix_tokens=prefix_len,
                new_tokens=request.params.max_new_tokens,
            )
        if not self.scheduler.fits_alone(max_len):
            raise InvalidInput(
                f"request needs {max_len} KV slots; the batch token budget is "
                f"{self.scheduler.config.max_batch_tokens}: lower max_new_tokens or the prompt",
                param="max_new_tokens",
            )
        loop = asyncio.get_running_loop()
        context = self.runner.detokenizer_context(request.prompt_ids)  # what the first token decodes after
        tracked = _Tracked(
            request_id=f"req-{next(self._ids)}-{secrets.token_hex(4)}",
            request=request,
            max_len=max_len,
            loop=loop,
            events=asyncio.Queue(),
            detokenizer=None
            if self.tokenizer is None
            else IncrementalDetokenizer(self.tokenizer, context, request.params.skip_special_tokens),
            stop=StopMatcher(request.params.stop, request.params.include_stop_str_in_output),
        )
        with self._lock:
            if not self._accepting:
                raise Unavailable("the server is shutting down")
            try:
                self.scheduler.add(tracked.request_id, max_len, request.tenant, len(request.prompt_ids))
            except QueueFull as exc:
                raise Overloaded(str(exc)) from exc
            self._tracked[tracked.request_id] = tracked
        self._wakeup.put(None)
        return tracked

    def _checked(self, params: SamplingParams) -> SamplingParams:
        """``params`` with what the engine fills in (``held_back``), or InvalidInput (400) saying what is wrong."""
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and not 0 <= asked <= MAX_LOGPROBS:
                raise InvalidInput(f"{name} must be between 0 and {MAX_LOGPROBS}, got {asked}", param=name)
        if params.prompt_logprobs is not None and not self.runner.scores_prompts:
            raise InvalidInput(
                "prompt log-probabilities need a decoder-only model (this one encodes the prompt)",
                param="prompt_logprobs",
            )
        if not 0.0 <= params.min_p <= 1.0:
            raise InvalidInput(f"min_p must be between 0 and 1, got {params.min_p}", param="min_p")
        if not (params.repetition_penalty > 0 and math.isfinite(params.repetition_penalty)):
            raise InvalidInput(
                f"repetition_penalty must be a positive number, got {params.repetition_penalty}",
                param="repetition_penalty",
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(params, name) <= 2.0:
                raise InvalidInput(f"{name} must be between -2 and 2, got {getattr(params, name)}", param=name)
        vocab = self.runner.vocab_size
        for name, tokens in (
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
        ):
            if len(tokens) > MAX_LISTED_TOKENS:
                raise InvalidInput(f"{name} may name at most {MAX_LISTED_TOKENS} tokens", param=name)
            if any(not 0 <= token < vocab for token in tokens):
                raise InvalidInput(f"{name} token ids must be between 0 and {vocab - 1}", param=name)
        if any(not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS for _, bias in params.logit_bias):
            raise InvalidInput(
                f"logit_bias values must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}", param="logit_bias"
            )
        if not 0 <= params.min_tokens <= params.max_new_tokens:
            raise InvalidInput(
                f"min_tokens must be between 0 and max_new_tokens ({params.max_new_tokens})", param="min_tokens"
            )
        if params.grammar is not None and (params.ignore_eos or params.min_tokens):
            # A grammar ends with EOS, the only token it allows once the text is complete.
            raise InvalidInput(
                f"a {params.grammar.spec.describe()} cannot be combined with ignore_eos or min_tokens",
                param="ignore_eos" if params.ignore_eos else "min_tokens",
            )
        if params.top_k < 0:
            raise InvalidInput(f"top_k must be 0 (off) or positive, got {params.top_k}", param="top_k")
        # A top_k of the vocabulary or more keeps every token: it is off (and a huge one overflowed the int64 tensor
        # the sampler builds for the batch, failing every row sampled with it).
        top_k = params.top_k if params.top_k < vocab else 0
        ending = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        return dataclasses.replace(params, top_k=top_k, held_back=tuple(sorted(ending)) if params.min_tokens else ())

    def abort(self, request_id: str) -> None:
        """Cancel a request: a waiting one leaves the queue now, a running one frees its row next step."""
        with self._lock:
            tracked = self._tracked.get(request_id)
            if tracked is None or tracked.done:
                return
            tracked.cancelled = True
            if self.scheduler.remove(request_id):
                self._finish(tracked, GenerationEvent(None, "", "cancelled"))
        self._wakeup.put(None)

    def abort_all(self) -> None:
        """Cancel every request not yet finished (a server stopping after its drain time)."""
        with self._lock:
            request_ids = [request_id for request_id, tracked in self._tracked.items() if not tracked.done]
        for request_id in request_ids:
            self.abort(request_id)

    # ----- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        self._engine_thread_id = threading.get_ident()
        pin_torch_threads(ENGINE_TORCH_THREADS)  # whatever single-threaded I/O threads set process-wide
        while True:
            if not self._groups and not self._prefilling and self.scheduler.num_waiting == 0 and self._ahead is None:
                if not self._running:
                    return
                for hook in self.idle_hooks:
                    try:
                        hook()
                    except Exception:  # a hook's failure is its own: the engine goes on
                        log.exception("engine idle hook failed")
                self._step_clock.idle()
                self._wakeup.get()  # idle: block until something arrives
            self._step_clock.tick(time.perf_counter())
            try:
                # Inference mode for all of it, not only the forwards: tensors the engine makes between them (rows
                # filtered, groups joined) are then inference tensors too, like those a compiled step was built on.
                with (
                    self.step_gaps.step() if self.step_gaps is not None else contextlib.nullcontext(),
                    torch.inference_mode(),
                ):
                    self._step()
            except Exception as exc:  # a failed forward fails its requests, never the thread
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_running(f"generation failed: {exc}")
            finally:
                self._flush_outbox()

    def _step(self) -> None:
        with self._lock:
            rows = [self._tracked[r] for r in self._running_ids()] + [p.tracked for p in self._prefilling]
            running = [Running(t.max_len, t.request.tenant) for t in rows]
            admitted = [self._tracked[r] for r in self.scheduler.admit(running)]
        for t in admitted:
            if t.cancelled:  # aborted since admission took it off the queue: abort() found nothing to remove
                self._finish(t, GenerationEvent(None, "", "cancelled"))
        admitted = [t for t in admitted if not t.cancelled]
        if self.prompt_cache is not None:
            for t in admitted:
                t.cached = self._cached_head(t)
        if self._chunk_tokens:
            rows_of: dict[str, int] = {}  # rows each tenant holds, decoding or prefilling, as admission counted
            for t in rows + admitted:
                rows_of[t.request.tenant] = rows_of.get(t.request.tenant, 0) + 1
            self._fused_step(admitted, rows_of)
            return
        if admitted:
            self._settle_ahead()  # the newcomers join the running batch: hand out its last tokens first
            try:
                new_batch, tokens = self.runner.prefill([self._new_request(t) for t in admitted])
            except Exception as exc:
                log.error("prefill failed:\n%s", traceback.format_exc())
                for t in admitted:
                    self._finish(t, GenerationEvent(None, "", "error", error=f"prefill failed: {exc}"))
                new_batch = None
            if new_batch is not None:
                for row, t in enumerate(admitted):
                    self._remember_prompt(t, new_batch, row)
                if self.metrics is not None:
                    self.metrics.prefilled([t.request for t in admitted])
                for t in admitted:
                    if t.request.params.prompt_logprobs is not None:  # decoder-only runners: checked at submit
                        t.prompt_logprobs = self.runner.last_prompt_logprobs.get(t.request_id)
                new_batch = self._consume(new_batch, tokens, observe=True)
                if new_batch is not None:
                    self._groups = [type(new_batch).concatenate([*self._groups, new_batch])]
        self._decode()

    def _decode(self) -> None:
        """A decode step of every running row, with no prompt chunk. With overlap, this step is launched first
        and the previous one's tokens are handed out while it runs."""
        if self._may_speculate():
            self._settle_ahead()  # the drafts follow every row's last token: hand it out first
            drafts = self._drafts()
            if drafts is not None:
                self._speculate(drafts)
                return
        groups = self._groups
        if not groups:
            self._settle_ahead()
            return
        # One group: the plain decode step, which every runner has. Several: a fused step with no chunk.
        tokens = [self.runner.decode(groups[0])] if len(groups) == 1 else self.runner.fused_step(groups, [])[0]
        launched: _Launched | None = _Launched.of(groups, tokens)
        if self._overlap:
            launched, self._ahead = self._ahead, launched
        if launched is not None:
            self._settle(launched)

    def _settle(self, launched: _Launched) -> None:
        """Hand out a decode step's tokens; the running groups lose the rows that ended."""
        self._drop(self._hand_out(launched, observe=True))

    def _drop(self, left: set[str]) -> None:
        """The running groups without the rows of ``left`` (requests that ended)."""
        if left:
            groups = [g.drop(left) for g in self._groups]
            self._groups = [g for g in groups if g is not None]

    # ----- speculative decoding ------------------------------------------------------------------

    def _may_speculate(self) -> bool:
        """Whether this decode step may verify drafts: few rows decode, none with state that follows its tokens
        one at a time (``speculates``)."""
        config = self.speculative
        if not config.enabled or not self._groups or sum(len(g) for g in self._groups) > config.max_rows:
            return False
        tracked = [self._tracked.get(r) for r in self._running_ids()]
        return all(t is not None and speculates(t.request.params) for t in tracked)

    def _drafts(self) -> list[list[list[int]]] | None:
        """Per group and row, the drafts to verify after the row's last token: prompt lookup's proposals, cut to
        the length ``plan`` finds best; None when a plain step is best (or no row has a proposal)."""
        tracked = [self._tracked[r] for r in self._running_ids()]
        speculations = [self._speculation(t) for t in tracked]
        proposals = [s.proposal(t.generated, self._draft_room(t)) for s, t in zip(speculations, tracked, strict=True)]
        k = plan(proposals, [s.acceptance for s in speculations], self.speculative)
        if k == 0:
            for speculation, proposal in zip(speculations, proposals, strict=True):
                if proposal:
                    speculation.skipped()
            return None
        rows = iter(proposal[:k] for proposal in proposals)
        return [[next(rows) for _ in range(len(g))] for g in self._groups]

    def _speculation(self, t: _Tracked) -> RowSpeculation:
        if t.speculation is None:
            key = self._prefix_key(t.request)
            task = None if self.task_history is None or key is None else self.task_history.of(t.request.tenant, key)
            t.speculation = RowSpeculation(t.request.prompt_ids, self.speculative, task, t.request.prediction)
        return t.speculation

    def _remember_output(self, t: _Tracked) -> None:
        """Keep a finished request's output for its task's later requests to draft from."""
        key = self._prefix_key(t.request)
        if self.task_history is not None and key is not None and speculates(t.request.params):
            self.task_history.of(t.request.tenant, key).add(t.request.prompt_ids, t.generated)

    @staticmethod
    def _draft_room(t: _Tracked) -> int:
        """Drafts a row may take: a step yields up to 1 + k tokens and puts k + 1 more columns in the row's KV
        (its last token, not in yet, and k drafts), within what the request may still generate and what
        admission reserved for it."""
        in_kv = t.request.prefix_len + len(t.request.prompt_ids) + len(t.generated) - 1
        return min(t.request.params.max_new_tokens - len(t.generated), t.max_len - in_kv) - 1

    def _speculate(self, drafts: list[list[list[int]]]) -> None:
        """A decode step that verifies ``drafts`` (server/speculative.py), then hands each row its tokens."""
        groups = self._groups
        rows = [row for g in groups for row in g.rows]
        yielded = self.runner.speculative_step(groups, drafts)
        now = time.perf_counter()
        for request_id, row_drafts, tokens in zip(
            (r.request_id for r in rows), (d for group in drafts for d in group), yielded, strict=True
        ):
            t = self._tracked.get(request_id)
            if t is not None and t.speculation is not None:
                t.speculation.verified(len(row_drafts), len(tokens) - 1)
        positions = [p for g in groups for p in g.next_positions.tolist()]
        if self.metrics is not None:
            self.metrics.forward_pass(rows, sum(len(g) * g.width for g in groups), sum(positions))
            self.metrics.speculative_draft_tokens.inc(sum(len(d) for group in drafts for d in group))
            self.metrics.speculative_accepted_tokens.inc(sum(len(tokens) - 1 for tokens in yielded))
        self._drop(self._give(rows, yielded, positions, [None] * len(rows), now))

    def _settle_ahead(self) -> None:
        """Hand out the tokens of the step launched ahead, if any (before anything else changes the batch)."""
        if self._ahead is not None:
            launched, self._ahead = self._ahead, None
            self._settle(launched)

    def _fused_step(self, admitted: list[_Tracked], rows_of: dict[str, int]) -> None:
        """Admitted requests start prefilling; one forward decodes the batch and feeds the next prompt chunks."""
        self._prefilling.extend(_Prefilling(t) for t in admitted)
        for entry in [p for p in self._prefilling if p.tracked.cancelled]:
            self._prefilling.remove(entry)
            self._finish(entry.tracked, GenerationEvent(None, "", "cancelled"))
        scheduled = self._start_rows(self._next_chunks(rows_of))
        if not scheduled:
            self._decode()
            return
        self._settle_ahead()
        chunks = [(entry.pending, n) for entry, n in scheduled]
        if self._groups and self.metrics is not None:  # the prompt tokens running rows wait for this step
            self.metrics.step_prompt_tokens.observe(sum(n for _, n in chunks))
        group_tokens, firsts = self.runner.fused_step(self._groups, chunks)
        # The chunks' rows count in the forward's batch metrics too: each is a one-row KV with no padding.
        chunk_rows = [pending.batch.rows[0] for pending, _ in chunks]
        chunk_slots = sum(pending.batch.width for pending, _ in chunks)
        if self._groups:
            self._settle(_Launched.of(self._groups, group_tokens, chunk_rows, chunk_slots))
        elif self.metrics is not None:
            self.metrics.forward_pass(chunk_rows, chunk_slots, chunk_slots)
        joining: list[Batch] = []
        for (entry, _), first in zip(scheduled, firsts, strict=True):
            if first is None:
                continue
            self._prefilling.remove(entry)
            self._remember_prompt(entry.tracked, entry.pending.batch, 0)
            if self.metrics is not None:
                self.metrics.prefilled([entry.tracked.request])
            if entry.pending.prompt_logprobs_asked is not None:
                entry.tracked.prompt_logprobs = entry.pending.prompt_logprobs
            row = self._consume(entry.pending.batch, first, observe=False)
            if row is not None:
                joining.append(row)
        if joining:
            self._groups = kv_groups.join(self._groups, joining, self._max_groups)

    def _start_rows(self, scheduled: list[tuple[_Prefilling, int]]) -> list[tuple[_Prefilling, int]]:
        """Make the rows of requests getting their first chunk; a request whose row fails is failed and dropped."""
        started = []
        for entry, n in scheduled:
            if entry.pending is None:
                try:
                    entry.pending = self.runner.begin_prefill(self._new_request(entry.tracked))
                except Exception as exc:
                    log.error("prefill failed:\n%s", traceback.format_exc())
                    self._prefilling.remove(entry)
                    self._finish(entry.tracked, GenerationEvent(None, "", "error", error=f"prefill failed: {exc}"))
                    continue
            started.append((entry, n))
        return started

    def _next_chunks(self, rows_of: dict[str, int]) -> list[tuple[_Prefilling, int]]:
        """This step's prompt chunks: up to ``prefill_chunk_tokens`` tokens in all, so that running rows' inter-token
        latency stays low. With ``prefill_deadline_s``, fewer while every prompt can still finish within that
        long of its submission at the rate chosen (server/prefill_pacing.py): a burst with time to spare is spread
        over more, shorter steps. While fewer rows decode than prompts wait (a burst outnumbering them), the budget
        grows in proportion, up to what admission allows at once (``max_prefill_tokens``, 0: no limit), which is
        also the budget when no row decodes (nobody's latency to protect). Fed 64 tokens a step, a burst of 32
        prompts joined over 11 steps and its last rows decoded in a dwindling batch: 32 concurrent requests ran at
        130 tok/s that way against 165 with separate prefill.

        Prompts of tenants holding the fewest rows go first, as in admission (oldest first among equals): a
        tenant flooding the server cannot keep another's admitted prompt waiting behind its own.

        While rows decode, each chunk also pays its fixed cost out of the budget, in tokens (``chunk_overhead``):
        a burst of one-token prompts with long prefixes costs the step far more than its tokens.
        """
        budget = self._chunk_tokens
        decoding, waiting = sum(len(g) for g in self._groups), len(self._prefilling)
        if decoding < waiting:
            limit = self.scheduler.config.max_prefill_tokens or sum(p.remaining for p in self._prefilling)
            budget = max(budget, limit if decoding == 0 else min(limit, budget * waiting // decoding))
        elif self._deadline_s and self._step_clock.step_s is not None:
            costs = [(p.tracked.submitted_at, p.remaining + chunk_overhead(p)) for p in self._prefilling]
            budget = paced_budget(
                costs,
                now=time.perf_counter(),
                step_s=self._step_clock.step_s,
                deadline_s=self._deadline_s,
                floor=max(1, budget // PACING_FLOOR_DIVISOR),
                ceiling=budget,
            )
        chunks: list[tuple[_Prefilling, int]] = []
        for entry in sorted(self._prefilling, key=lambda e: rows_of.get(e.tracked.request.tenant, 0)):
            overhead = chunk_overhead(entry) if decoding else 0
            room = budget - overhead
            # The first chunk of a step always goes in, however small the budget: prompts make progress.
            n = min(entry.remaining, room if chunks else max(1, room))
            if n <= 0:
                break
            chunks.append((entry, n))
            budget -= n + overhead
        return chunks

    @staticmethod
    def _new_request(t: _Tracked) -> NewRequest:
        request = t.request
        return NewRequest(
            t.request_id, request.prompt_ids, request.params, request.prefix_kv, request.prefix_id, t.cached
        )

    # ----- prompt cache --------------------------------------------------------------------------

    @staticmethod
    def _prefix_key(request: GenerationRequest) -> str | None:
        """The request's prefix, by its id (tenant, task, version, content hash): what a prompt's cached K/V depend
        on besides its tokens, and whose outputs draft for its later requests. "TENANT/" for the base model: each
        tenant's prompts are cached apart, or a tenant could tell from its usage's cached_tokens how much of its
        guess another tenant's prompt matched. None when a prefix comes without an id (such a request is never
        cached, nor its outputs kept)."""
        if request.prefix_kv is None:
            return f"{request.tenant}/"  # the base model, for this tenant (task ids never end a key like this)
        return request.prefix_id

    def _cached_head(self, t: _Tracked) -> CachedPrompt | None:
        """The admitted request's prompt head from the cache (prompt log-probabilities need every prompt token's
        logits, so those requests compute theirs)."""
        key = self._prefix_key(t.request)
        if self.prompt_cache is None or key is None or t.request.params.prompt_logprobs is not None:
            return None
        cached = self.prompt_cache.lookup(key, t.request.prompt_ids)
        if cached is not None and self.metrics is not None:
            self.metrics.prompt_cache_hit_tokens.inc(cached.tokens)
        return cached

    def _remember_prompt(self, t: _Tracked, batch: Batch, row: int) -> None:
        """Keep the K/V of the whole prompt of ``row`` (just prefilled) for later requests of its prefix."""
        key = self._prefix_key(t.request)
        if self.prompt_cache is None or key is None or not isinstance(self.runner, ModelRunner):
            return
        runner = self.runner
        try:
            self.prompt_cache.store(
                key,
                t.request.prompt_ids,
                lambda start, end: runner.prompt_kv(batch, row, start, end),
                owner=t.request.tenant,
            )
        except Exception:  # the cache saves work; failing to fill it must not fail the rows
            log.error("storing a prompt in the prompt cache failed:\n%s", traceback.format_exc())

    def _consume(self, batch: Batch, tokens: torch.Tensor, observe: bool) -> Batch | None:
        """Hand each row of a new batch its first token; return the batch without the rows that ended.
        ``observe``: the forward was the batch's own (a prefill), so it goes into the batch metrics."""
        left = self._hand_out(_Launched.of([batch], [tokens]), observe)
        return batch.filter([r for r in batch.request_ids if r not in left])

    def _hand_out(self, launched: _Launched, observe: bool) -> set[str]:
        """Give each row of a step its token; returns the request ids that ended, or had ended before (overlap)."""
        tokens, positions = launched.values()
        now = time.perf_counter()  # after the wait above: the forward pass has finished
        rows = [row for group in launched.rows for row in group]
        metrics = self.metrics
        if observe and metrics is not None:
            # By the batch invariant each row's real KV slots equal its next position: no mask reduction needed.
            slots, real = launched.slots + launched.chunk_slots, sum(positions) + launched.chunk_slots
            metrics.forward_pass([*rows, *launched.chunk_rows], slots, real)
        logprobs = launched.row_logprobs() if any(launched.logprobs) else [None] * len(rows)
        return self._give(rows, [[token] for token in tokens], positions, logprobs, now)

    def _give(
        self,
        rows: Sequence[RowInfo],
        tokens: Sequence[Sequence[int]],
        positions: Sequence[int],
        logprobs: Sequence[tuple[float, list[int], list[float]] | None],
        now: float,
    ) -> set[str]:
        """Hand each row its tokens of a step, sampled at ``now``: one, or after a speculative step one or more
        (``positions``: each row's next position after them; ``logprobs`` go with a single token). Returns the
        request ids that ended, or had ended before (overlap)."""
        left: set[str] = set()
        live: list[tuple[RowInfo, _Tracked, Sequence[int], int, TokenLogprob | None]] = []  # rows getting tokens
        for row, row_tokens, position, row_logprobs in zip(rows, tokens, positions, logprobs, strict=True):
            tracked = self._tracked.get(row.request_id)
            if tracked is None or tracked.done:  # ended in the step before this one (overlap): token dropped
                left.add(row.request_id)
            elif tracked.cancelled:
                self._finish(tracked, GenerationEvent(None, "", "cancelled"))
                left.add(row.request_id)
            else:
                asked = tracked.request.params.logprobs
                logprob = None
                if asked is not None and row_logprobs is not None:
                    chosen, top_ids, top_values = row_logprobs
                    logprob = TokenLogprob(chosen, tuple(zip(top_ids[:asked], top_values[:asked], strict=True)))
                live.append((row, tracked, row_tokens, position, logprob))
        handed: list[RowInfo] = []  # a row once per token it took
        for row, tracked, row_tokens, position, logprob in live:
            first_position = position - len(row_tokens) + 1  # where the row's first token of the step goes next
            for i, token in enumerate(row_tokens):
                handed.append(row)
                if self._emit(tracked, token, first_position + i, now, logprob):
                    left.add(row.request_id)
                    break  # a speculative step's tokens after the end are dropped
        if self.metrics is not None:
            # Once per step (per task label), not per row; and before the step's events go out (_flush_outbox), so
            # a client that has received its last token (and then scrapes /metrics) finds that token counted.
            self.metrics.generated(handed)
        return left

    def _emit(self, tracked: _Tracked, token: int, position: int, now: float, logprob: TokenLogprob | None) -> bool:
        """Record one token sampled at ``now`` (perf_counter); returns True when the request finished."""
        if self.metrics is not None:
            if tracked.generated:
                # Once per step, as vLLM does: the tokens a speculative step accepts arrive together (same `now`),
                # and a zero gap for each would pull the histogram's quantiles to 0.
                if now != tracked.last_token_at:
                    self.metrics.inter_token_latency.observe(now - tracked.last_token_at)
            else:
                self.metrics.first_token(tracked.request.prefix_id, now - tracked.submitted_at)
        tracked.last_token_at = now
        tracked.generated.append(token)
        params = tracked.request.params
        finish: str | None = None
        piece = ""
        if token in self.eos_token_ids and not params.ignore_eos:
            finish = "eos"
        elif token in params.stop_token_ids:  # like EOS: ends the request, its text not part of the output
            finish = "stop"
        elif tracked.detokenizer is not None:
            piece = tracked.detokenizer.push(token)
        # ``position`` is where this token would go next; the context has no room past max_context.
        if finish is None and (len(tracked.generated) >= params.max_new_tokens or position >= self.max_context):
            finish = "length"
        # Stop strings count once more than min_tokens tokens exist (vLLM's rule): the sampler holds back EOS and
        # stop tokens until then, and a stop string in the first tokens' text ended the request too soon.
        matching = len(tracked.generated) > params.min_tokens
        text, stopped = tracked.stop.feed(piece, matching)
        if stopped:
            finish = "stop"
        elif finish is not None:
            tail = tracked.detokenizer.flush() if tracked.detokenizer is not None else ""
            tail_text, stopped = tracked.stop.feed(tail, matching)
            text += tail_text
            if stopped:
                finish = "stop"
            else:
                text += tracked.stop.flush()
        speculation = tracked.speculation
        event = GenerationEvent(
            token_id=token,
            text=text,
            finish_reason=finish,
            prompt_tokens=len(tracked.request.prompt_ids),
            cached_tokens=0 if tracked.cached is None else tracked.cached.tokens,
            accepted_prediction_tokens=0 if speculation is None else speculation.prediction_accepted,
            rejected_prediction_tokens=0 if speculation is None else speculation.prediction_rejected,
            completion_tokens=len(tracked.generated),
            logprob=logprob,
            prompt_logprobs=tracked.prompt_logprobs if len(tracked.generated) == 1 else None,
        )
        if finish is None:
            self._send(tracked, event)
            return False
        self._remember_output(tracked)
        self._finish(tracked, event)
        return True

    def _finish(self, tracked: _Tracked, event: GenerationEvent) -> None:
        tracked.done = True
        self._send(tracked, event)
        with self._lock:
            self._tracked.pop(tracked.request_id, None)

    def _fail_running(self, message: str) -> None:
        request_ids = self._running_ids() + [p.tracked.request_id for p in self._prefilling]
        self._groups, self._prefilling, self._ahead = [], [], None
        for request_id in request_ids:
            tracked = self._tracked.get(request_id)
            if tracked is not None:
                self._finish(tracked, GenerationEvent(None, "", "error", error=message))

    def _send(self, tracked: _Tracked, event: GenerationEvent) -> None:
        """Deliver an event: at the end of the step when the engine thread sends it, else at once."""
        if threading.get_ident() == self._engine_thread_id:
            self._outbox.setdefault(tracked.loop, []).append((tracked, event))
        else:  # abort() on the event loop's thread
            _deliver_soon(tracked.loop, [(tracked, event)])

    def _flush_outbox(self) -> None:
        """One wake-up per event loop for all of a step's events (each wake-up is a write to the loop's pipe)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            _deliver_soon(loop, items)


def _deliver_soon(loop: asyncio.AbstractEventLoop, items: list[tuple[_Tracked, GenerationEvent]]) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the requests' event loop is gone: nobody is listening
        for tracked, _ in items:
            tracked.cancelled = True


def _deliver(items: list[tuple[_Tracked, GenerationEvent]]) -> None:
    """On the event loop: hand each event to its request's queue, in the order the engine produced them."""
    for tracked, event in items:
        tracked.events.put_nowait(event)
