"""Prefill pacing: how many prompt tokens a decode step carries while prompts have time to spare.

A prompt chunk fused into a decode step lengthens that step for every running stream: on the 2-core CPU a
prompt token adds ~1.1 ms to a ~60 ms step of 16 rows (bench/RESULTS.md, tenth session). A burst of 16
newcomers fed the whole chunk budget (64) at once raised the streams' inter-token latency p99 1.6-2.8x; fed 16
tokens a step, 1.0-1.2x, with the newcomers' first tokens later by the extra steps. Under steady traffic the
small budget is too little: prompts arrive faster than 16 tokens a step and their first tokens wait seconds.

Pacing chooses, step by step, the smallest budget that still lets every prefilling prompt finish within
``deadline_s`` of its submission, earliest deadline first, between a floor and the whole budget. A prompt whose
deadline is already too close gets the whole budget, never more: at worst, a step carries what it carried
without pacing. A lone burst with time to spare is spread; a backlog is fed at full rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# The deadline on a CPU unless configured: S3's time-to-first-token objective is 2 s (bench/RESULTS.md).
DEFAULT_CPU_DEADLINE_S = 1.0

# A step interval longer than this is not a step's (the engine waited for work); it does not enter the estimate.
_MAX_STEP_S = 5.0


class StepClock:
    """The time between consecutive engine steps, smoothed: the unit a deadline is counted in."""

    def __init__(self, smoothing: float = 0.25) -> None:
        self.smoothing = smoothing  # weight of the newest interval
        self._last_start: float | None = None
        self.step_s: float | None = None  # None until two steps ran back to back

    def tick(self, now: float) -> None:
        """A step starts at ``now`` (perf_counter seconds)."""
        interval = None if self._last_start is None else now - self._last_start
        self._last_start = now
        if interval is None or interval >= _MAX_STEP_S:
            return
        if self.step_s is None:
            self.step_s = interval
        else:
            self.step_s += self.smoothing * (interval - self.step_s)

    def idle(self) -> None:
        """The engine is about to wait for work: the next interval measures the wait, not a step."""
        self._last_start = None


def paced_budget(
    prompts: Iterable[tuple[float, int]], *, now: float, step_s: float, deadline_s: float, floor: int, ceiling: int
) -> int:
    """Prompt tokens for this step: the least, at least ``floor``, with which every prompt meets its deadline if
    each later step carries as much; ``ceiling`` once that is not enough.

    ``prompts``: (submitted_at, tokens it still costs) per prefilling prompt, perf_counter seconds and budget
    tokens. Earliest deadline first: the first k prompts together need their tokens within the steps left
    before the k-th deadline, less one step of margin for the estimate of ``step_s``.
    """
    budget = floor
    needed = 0
    for submitted_at, tokens in sorted(prompts):
        needed += tokens
        steps_left = (submitted_at + deadline_s - now) / step_s - 1
        if steps_left < 1:
            return ceiling
        budget = max(budget, math.ceil(needed / steps_left))
        if budget >= ceiling:
            return ceiling
    return budget
