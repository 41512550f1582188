"""Decode steps of fixed shape, replayed from a CUDA graph while the running batch does not change.

On a GPU a decode step of a 1B model is host-bound: at batch 64 on an H200 the eager step took 14.5 ms
while its kernels kept the GPU busy for ~4.7 of them (bench/gpu.py's profile). A CUDA graph replays the
step's kernels with one launch. A graph fixes every shape and every address, so this step is written
with none that change from one step to the next:

* the tokens go in flat, as a [1, B] sequence with positions [1, B] (static tensors the step copies into);
* each layer's new K/V column is written with ``index_copy_`` at a column held in a device tensor, not at a
  Python int;
* attention takes all C columns of the [B, H_kv, C, d] buffers under a [B, 1, 1, C] mask (also a static
  tensor): columns past the row's new one are masked out like padding. Masked columns add exact zeros, so
  the result is the eager step's, up to the order of float sums. On CUDA a Triton kernel
  (server/decode_attention.py) reads the column from the device and stops there, so the free columns are never
  read; elsewhere SDPA reads them all.

With several padded groups (server/kv_groups.py) the rows come group after group and each group attends to
its own buffers, as in a fused step. A graph belongs to one set of KV buffers. Joins, leaves and growth replace
them (``Batch.filter``, ``Batch.concatenate``, ``with_room``), so the graph is captured only after
``CAPTURE_AFTER`` steps on the same buffers and dropped as soon as they change; steps in between run the same
function eagerly. On a CPU (tests) there is no graph: the function always runs eagerly.

With ``compile_forward`` the step's forward goes through ``torch.compile`` (Inductor, dynamic shapes) first:
the norms, rotary embedding, activations and residual adds of each layer become a few fused kernels instead
of dozens of small ones, and the graph then replays those. One compile covers every batch size and KV width
(both symbolic); a different number of groups compiles once more. A group of one row would compile once more
for each place it can take (dynamo specialises sizes of 1), so steps with such a group run uncompiled (still
from a graph). It is opt-in (``--compile-decode``): each compile takes tens of seconds, so the server runs them
at startup (``ModelRunner.compile_decode_steps``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.batch import Batch
from server.decode_attention import decode_attention
from server.fused_step import LAYOUT_KWARG, decode_rows_attention, placeholder_mask

log = logging.getLogger(__name__)

# Eager steps on the same buffers before a graph is captured: a capture costs about two eager steps, so a
# batch that changes every few steps (arrivals, finishes) never pays for graphs it cannot reuse.
CAPTURE_AFTER = 4


@dataclass(frozen=True)
class StaticGroup:
    """Where one padded group of rows writes and reads in a fixed-shape step."""

    keys: list[torch.Tensor]  # per layer [B_g, H_kv, C_g, d]
    values: list[torch.Tensor]
    column: torch.Tensor  # [1] int64: the column this step's K/V go to (T_g, the group's width)
    mask: torch.Tensor  # [B_g, 1, 1, C_g] bool: each row's real columns and ``column``


@dataclass(frozen=True)
class StaticDecodeLayout:
    """A fixed-shape decode step (passed to attention as ``LAYOUT_KWARG``): the groups' rows, in order."""

    groups: list[StaticGroup]
    # Attention by server/decode_attention.py's kernel (reads each row's KV up to the step's column) rather than
    # SDPA over all C columns under the mask.
    kernel: bool = False


def static_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H_q, B, d]: one token per row, laid out flat, group after group
    key: torch.Tensor,  # [1, H_kv, B, d], rotary already applied
    value: torch.Tensor,  # [1, H_kv, B, d]
    layout: StaticDecodeLayout,
    scaling: float | None,
) -> torch.Tensor:
    """Attention output [1, B, H_q, d]; writes the step's K/V at each group's ``column``."""
    layer = module.layer_idx
    parts = []
    offset = 0
    for group in layout.groups:
        keys, values = group.keys[layer], group.values[layer]
        span = slice(offset, offset + keys.shape[0])
        keys.index_copy_(2, group.column, key[0, :, span].transpose(0, 1)[:, :, None])  # [B_g, H_kv, 1, d]
        values.index_copy_(2, group.column, value[0, :, span].transpose(0, 1)[:, :, None])
        rows = query[0, :, span].transpose(0, 1)  # [B_g, H_q, d]
        if layout.kernel:  # the shapes stay the same; the kernel reads up to ``column``, the rest stays unread
            scale = rows.shape[-1] ** -0.5 if scaling is None else scaling
            parts.append(decode_attention(rows, keys, values, group.mask[:, 0, 0], group.column, scale))
        else:  # all C_g columns under the mask: the shapes stay the same from step to step
            parts.append(decode_rows_attention(rows, keys, values, group.mask, scaling))
        offset = span.stop
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]


class _Step:
    """The static inputs and outputs of one set of groups' step, and its graph once captured."""

    def __init__(self, groups: Sequence[Batch], forward: Callable[..., torch.Tensor], kernel: bool) -> None:
        rows = sum(len(batch) for batch in groups)
        device = groups[0].keys[0].device
        self.buffers = _addresses(groups)
        self.input_ids = torch.zeros(1, rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(1, rows, dtype=torch.int64, device=device)
        self.layout = StaticDecodeLayout(
            [
                StaticGroup(
                    batch.keys,
                    batch.values,
                    torch.zeros(1, dtype=torch.int64, device=device),
                    torch.zeros(len(batch), 1, 1, batch.keys[0].shape[2], dtype=torch.bool, device=device),
                )
                for batch in groups
            ],
            kernel,
        )
        self.no_mask = placeholder_mask(device)
        self.forward = forward  # compiled or not
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output [B, V] float32

    def load(self, groups: Sequence[Batch]) -> None:
        """Copy this step's inputs into the static tensors (a few small kernels per group, no host sync)."""
        offset = 0
        for batch, group in zip(groups, self.layout.groups, strict=True):
            width, span = batch.width, slice(offset, offset + len(batch))
            self.input_ids[0, span].copy_(batch.next_input_ids)
            self.positions[0, span].copy_(batch.next_positions)
            group.column.fill_(width)
            mask = group.mask[:, 0, 0]  # [B_g, C_g]
            mask[:, :width].copy_(batch.attention_mask)
            mask[:, width:].fill_(False)
            mask[:, width] = True
            offset += len(batch)

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            return self.logits
        return self.forward(self.input_ids, self.positions, self.no_mask, self.layout)

    def capture(self) -> None:
        """Record the step as a graph. Warm-up and capture write the same K/V as the real step will."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(self.input_ids, self.positions, self.no_mask, self.layout)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.forward(self.input_ids, self.positions, self.no_mask, self.layout)
        self.graph = graph


def _addresses(groups: Sequence[Batch]) -> tuple[int, ...]:
    """What a graph is bound to: per group the rows, the buffers' capacity and strides, and every buffer's
    address."""
    out: list[int] = []
    for batch in groups:
        first = batch.keys[0]
        out += [len(batch), first.shape[2], *first.stride(), *(t.data_ptr() for t in (*batch.keys, *batch.values))]
    return tuple(out)


class StaticDecoder:
    """Runs a batch's decode forward at fixed shapes; on CUDA, from a graph once the batch has settled."""

    def __init__(
        self, model: torch.nn.Module, use_graphs: bool, compile_forward: bool = False, kernel: bool = False
    ) -> None:
        self.model = model
        self.use_graphs = use_graphs
        self.kernel = kernel  # attention by server/decode_attention.py's kernel (the caller checked ``supported``)
        self.compiled = compile_forward
        # dynamic=True: rows and KV columns are symbolic from the first compile, so growth never recompiles.
        self._step_forward = torch.compile(self._forward, dynamic=True) if compile_forward else self._forward
        self._step: _Step | None = None
        self.captures = 0  # graphs recorded (tests and benchmarks read it)
        self.replays = 0

    def release(self) -> None:
        """Drop the current step: its graph, and its hold on the last batch's KV buffers."""
        self._step = None

    def logits(self, groups: Sequence[Batch]) -> torch.Tensor:
        """Logits [B, V] (float32) of every row's next token, groups in order; the step's K/V are then in each
        group's column T_g."""
        for batch in groups:
            batch.make_room_for_step()
        step = self._step
        if step is None or step.buffers != _addresses(groups):
            compiled = self.compiled and all(len(batch) > 1 for batch in groups)
            # The old graph (if any) goes with the old step.
            step = self._step = _Step(groups, self._step_forward if compiled else self._forward, self.kernel)
        step.load(groups)
        step.steps += 1
        if self.use_graphs and step.graph is None and step.steps > CAPTURE_AFTER:
            try:
                step.capture()
                self.captures += 1
            except Exception:  # something in the forward cannot be captured: stay eager, say so once
                log.warning("CUDA graph capture failed; decode steps stay eager", exc_info=True)
                self.use_graphs = False
                step.graph = None
        if step.graph is not None:
            self.replays += 1
        try:
            return step.run()
        except Exception:
            if step.graph is not None or step.forward == self._forward:  # not a compile: a real failure
                raise
            # torch.compile could not handle the forward (it fails before any kernel runs): say so once and
            # serve uncompiled. Running the step again rewrites the same K/V column, so nothing is lost.
            log.warning("torch.compile of the decode step failed; decode steps run uncompiled", exc_info=True)
            self.compiled = False
            self._step_forward = self._forward
            self._step = None
            return self.logits(groups)

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, no_mask: torch.Tensor, layout: StaticDecodeLayout
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=no_mask,
            use_cache=False,
            **{LAYOUT_KWARG: layout},
        )
        return out.logits[0].float()  # [B, V]
