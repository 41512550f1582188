"""In-process measurements shared by S2 and the GPU script: the engine vs the bare transformers loop.

Both sides do identical work: B prompts of the same length (distinct random token ids), greedy,
exactly ``new_tokens`` tokens each (EOS ignored), no prefix unless one is given to the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from server.config import ServeConfig
from server.cpu_linear import stock_linear
from server.engine import Engine, GenerationRequest
from server.fused_projections import unfused
from server.metrics import EngineMetrics
from server.model_loading import LoadedModel
from server.prefill_pacing import DEFAULT_CPU_DEADLINE_S
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.scheduler import SchedulerConfig
from server.speculative import SpeculativeConfig
from server.text_stream import Decoder


@dataclass
class Timing:
    seconds: float
    tokens: int
    prefill_s: float | None = None  # bare loop only: the first forward (prompt) alone

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the lowest ids, where special tokens usually live.
    return torch.randint(100, vocab_size, (batch, prompt_len), generator=g).tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stock_model(model: PreTrainedModel) -> Iterator[None]:
    """Run the model as transformers ships it: its own SDPA attention, its own layers' forwards and torch's default
    linear kernel, whatever the server switched on it (server/attention.py, server/fused_projections.py,
    server/cpu_linear.py)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with unfused(model), stock_linear(model):
            yield
    finally:
        model.set_attn_implementation(previous)


def bare_loop(model: PreTrainedModel, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int = 0) -> Timing:
    """Batched greedy decoding with the model's own forward and a ``DynamicCache``: left padding + attention mask."""
    with stock_model(model), torch.inference_mode():
        return _bare_loop(model, prompts, new_tokens, pad_id)


def _bare_loop(model: PreTrainedModel, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int) -> Timing:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    synchronize(device)
    start = time.perf_counter()
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    generated = 1
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated += 1
    synchronize(device)
    return Timing(time.perf_counter() - start, generated * len(prompts), prefill_s)


def make_engine(
    model: PreTrainedModel,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    max_context: int,
    batch: int,
    *,
    static_decode: bool | None = None,
    compile_decode: bool = False,
    overlap_steps: bool | None = None,
    onednn_linear: bool = True,
    fuse_projections: bool | None = None,
    decode_kernel: bool = True,
    reserve_decode: bool | None = None,
    tokenizer: Decoder | None = None,
    eos_token_ids: Sequence[int] = (),
    metrics: EngineMetrics | None = None,
    speculative: SpeculativeConfig | None = None,
    **scheduler: int,
) -> Engine:
    """An engine for ``batch`` rows; ``scheduler`` overrides SchedulerConfig fields (e.g. prefill_chunk_tokens).
    ``static_decode``: the runner's fixed-shape decode step (CUDA graphs on a GPU); None, its default.
    ``compile_decode``: that step through torch.compile first. ``overlap_steps``: the engine's; None, its default
    (on CUDA: each step launched before the last one's tokens are handed out). ``onednn_linear``: the runner's
    (server/cpu_linear.py); False leaves the model's linear layers as they are. ``fuse_projections``: the
    runner's (server/fused_projections.py); None, its default (on CUDA). ``decode_kernel``: the runner's
    (server/decode_attention.py, where supported). ``reserve_decode``: the runner's (KV buffers that reserve their
    rows' decode steps; None, its default: with the kernel). ``tokenizer``, ``eos_token_ids``, ``metrics``,
    ``speculative``: the engine's (no text, no EOS, no metrics and no speculation by default)."""
    runner = ModelRunner(
        model,
        num_layers,
        num_kv_heads,
        head_dim,
        static_decode=static_decode,
        compile_decode=compile_decode,
        onednn_linear=onednn_linear,
        fuse_projections=fuse_projections,
        decode_kernel=decode_kernel,
        reserve_decode=reserve_decode,
    )
    config = SchedulerConfig(max_batch_size=batch, max_queue=max(256, 4 * batch), **scheduler)
    return Engine(
        runner,
        tokenizer,
        eos_token_ids=list(eos_token_ids),
        max_context=max_context,
        config=config,
        overlap_steps=overlap_steps,
        metrics=metrics,
        speculative=speculative,
    )


def cpu_served_engine(
    loaded: LoadedModel,
    batch: int,
    *,
    text: bool = False,
    metrics: EngineMetrics | None = None,
    speculative: SpeculativeConfig | None = None,
) -> Engine:
    """An engine for ``batch`` rows of the loaded model, scheduled as the server schedules on a CPU: fused chunked
    prefill, KV groups, paced prefill. No prompt cache (benchmarks switch it themselves), no speculation unless
    given. ``text``: with the model's tokenizer and EOS, so that stop strings and EOS end requests."""
    return make_engine(
        loaded.model,
        loaded.num_layers,
        loaded.num_kv_heads,
        loaded.head_dim,
        loaded.max_context,
        batch,
        prefill_chunk_tokens=ServeConfig.prefill_chunk_tokens,
        kv_groups=ServeConfig.kv_groups,
        prefill_deadline_s=DEFAULT_CPU_DEADLINE_S,
        tokenizer=loaded.tokenizer if text else None,
        eos_token_ids=loaded.eos_token_ids if text else (),
        metrics=metrics,
        speculative=speculative,
    )


async def _tokens(engine: Engine, request: GenerationRequest) -> list[int]:
    return [e.token_id async for e in engine.generate(request) if e.token_id is not None]


def engine_tokens(engine: Engine, requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Each request's tokens, all submitted at once to a started engine."""

    async def go() -> list[list[int]]:
        return list(await asyncio.gather(*(_tokens(engine, r) for r in requests)))

    return asyncio.run(go())


def engine_run(engine: Engine, requests: Sequence[GenerationRequest]) -> Timing:
    """All requests submitted at once to a started engine; wall time until the last finishes."""

    async def go() -> Timing:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(_tokens(engine, r) for r in requests))
        return Timing(time.perf_counter() - start, sum(len(t) for t in tokens))

    return asyncio.run(go())


def engine_requests(
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    prefixes: Sequence[torch.Tensor | None] | None = None,
) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    out = []
    for i, p in enumerate(prompts):
        kv = None if prefixes is None else prefixes[i % len(prefixes)]
        pid = None if kv is None or prefixes is None else f"t{i % len(prefixes)}"
        out.append(GenerationRequest(list(p), params, kv, pid))
    return out
