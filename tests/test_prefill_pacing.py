"""Prefill pacing (server/prefill_pacing.py): the least chunk budget with which every prompt meets its deadline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.api.app import _prefill_deadline_s
from server.config import ServeConfig
from server.prefill_pacing import DEFAULT_CPU_DEADLINE_S, StepClock, paced_budget
from tests.server_state import built_state


def budget(prompts: list[tuple[float, int]], now: float = 0.0, step_s: float = 0.1, deadline_s: float = 1.0) -> int:
    return paced_budget(prompts, now=now, step_s=step_s, deadline_s=deadline_s, floor=16, ceiling=64)


def test_a_prompt_with_time_to_spare_gets_the_floor() -> None:
    # 10 steps until its deadline, one of them margin: 40 tokens need 5 a step, less than the floor.
    assert budget([(0.0, 40)]) == 16


def test_the_budget_is_what_the_deadline_needs_between_floor_and_ceiling() -> None:
    assert budget([(0.0, 180)]) == 20  # 180 tokens in the 9 steps left
    assert budget([(0.0, 181)]) == 21  # rounded up
    assert budget([(0.0, 100), (0.0, 80)]) == 20  # one deadline: their tokens together
    assert budget([(0.0, 180)], now=0.5) == 45  # half the time gone: 4 steps left


def test_a_deadline_too_close_or_gone_gets_the_ceiling_and_no_more() -> None:
    assert budget([(0.0, 1000)]) == 64  # would need 112 a step
    assert budget([(0.0, 1)], now=0.85) == 64  # less than one step left after the margin
    assert budget([(0.0, 1)], now=5.0) == 64  # long past


def test_earliest_deadline_first() -> None:
    """A later prompt has its own deadline: its tokens add to the earlier ones' only at its own."""
    # The prompt submitted at 0.5 s has 14 steps left (0.5 + 1.0 - 0.0 = 1.5 s): (20 + 260) / 14 = 20 a step.
    assert budget([(0.5, 260), (0.0, 20)]) == 20
    # Order of the input does not matter, only the deadlines.
    assert budget([(0.0, 20), (0.5, 260)]) == 20
    # An early prompt's urgency sets the budget even with a later one needing little.
    assert budget([(0.5, 1), (0.0, 270)]) == 30


def test_no_prompts_is_the_floor() -> None:
    assert budget([]) == 16


def test_step_clock_smooths_back_to_back_steps_and_skips_idle_waits() -> None:
    clock = StepClock(smoothing=0.5)
    assert clock.step_s is None
    clock.tick(10.0)
    assert clock.step_s is None  # one step: no interval yet
    clock.tick(10.1)
    assert clock.step_s == pytest.approx(0.1)
    clock.tick(10.4)  # a 0.3 s step
    assert clock.step_s == pytest.approx(0.2)
    clock.idle()
    clock.tick(12.0)  # after an idle wait: not a step's interval
    assert clock.step_s == pytest.approx(0.2)
    clock.tick(12.2)
    assert clock.step_s == pytest.approx(0.2)
    clock.tick(30.0)  # a stall of many seconds (a long forward elsewhere?) is not taken as the step time
    assert clock.step_s == pytest.approx(0.2)


@pytest.mark.parametrize(("flag", "expected"), [(None, DEFAULT_CPU_DEADLINE_S), (0.0, 0.0), (2.5, 2.5)])
def test_a_cpu_server_paces_its_prefill_unless_told_otherwise(
    flag: float | None, expected: float, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = ServeConfig(store=f"disk://{tmp_path}", prefill_deadline_s=flag)
    with built_state(config, tiny_model_dir) as state:
        assert state.engine.scheduler.config.prefill_deadline_s == expected


def test_cuda_does_not_pace_by_default() -> None:
    """On CUDA a 64-token chunk costs a decode step little: pacing would delay first tokens for nothing."""
    assert _prefill_deadline_s(ServeConfig(), torch.device("cuda")) == 0.0
    assert _prefill_deadline_s(ServeConfig(prefill_deadline_s=0.5), torch.device("cuda")) == 0.5
