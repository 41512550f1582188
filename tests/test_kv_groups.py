"""Placement of joining rows into padded groups (server/kv_groups.py): fewest added padded slots, bounded count.

That rows decode correctly in several groups is tested against PEFT in tests/test_fused_step.py and through the
engine in tests/test_engine.py and tests/test_architectures.py.
"""

from __future__ import annotations

import asyncio

import pytest

from server import kv_groups
from server.engine import GenerationRequest
from server.kv_groups import added_padding, choose_group
from server.sampling import SamplingParams
from tests.test_batch import make_batch, real_kv
from tests.test_engine import collect, make_engine, prompt, tokens_of
from tests.tiny_models import tiny_llama


def test_added_padding_pads_the_row_or_every_row_of_the_group() -> None:
    assert added_padding(rows=4, width=10, row_width=7) == 3  # the newcomer is left-padded by 3
    assert added_padding(rows=4, width=10, row_width=10) == 0
    assert added_padding(rows=4, width=10, row_width=12) == 8  # each of the 4 rows gets 2 more columns


def test_a_row_starts_a_group_while_there_is_room_and_no_free_fit() -> None:
    assert choose_group([], 9, max_groups=1) is None  # the first row starts the first group
    assert choose_group([(3, 20)], 9, max_groups=2) is None  # 11 padded slots: a group of its own instead
    assert choose_group([(3, 20), (2, 9)], 9, max_groups=3) == 1  # an exact fit costs nothing
    assert choose_group([(3, 20)], 9, max_groups=1) == 0  # no room: the only group, whatever it costs


def test_a_row_joins_the_group_it_pads_least() -> None:
    shapes = [(5, 100), (1, 40), (3, 30)]
    # Width 35: group 0 costs 65, group 1 costs 5, group 2 costs 3 x 5 = 15.
    assert choose_group(shapes, 35, max_groups=3) == 1
    # Width 31: group 2 costs 3 x 1 = 3, group 1 costs 9.
    assert choose_group(shapes, 31, max_groups=3) == 2


@pytest.mark.parametrize("max_groups", [1, 2, 3])
def test_join_keeps_every_row_and_its_kv_within_the_group_bound(max_groups: int) -> None:
    groups = [make_batch("a", [3, 5], width=5)]
    joining = [make_batch(tag, [n], width=n) for tag, n in [("b", 9), ("c", 2), ("d", 5), ("e", 8)]]
    want = real_kv(groups[0])
    for batch in joining:
        want |= real_kv(batch)
    joined = kv_groups.join(groups, joining, max_groups)
    assert len(joined) == max_groups
    got = {}
    for g in joined:
        g.check()
        got |= real_kv(g)
    assert got.keys() == want.keys()
    for request_id, tensors in want.items():
        for mine, theirs in zip(got[request_id], tensors, strict=True):
            assert mine.equal(theirs), request_id


def test_join_groups_rows_of_similar_widths() -> None:
    """With three groups: a [3, 5] group; 9 then 8 together; 2 starts the third; 5 fits the first at no cost."""
    groups = [make_batch("a", [3, 5], width=5)]
    joining = [make_batch(tag, [n], width=n) for tag, n in [("b", 9), ("c", 2), ("d", 8), ("e", 5)]]
    joined = kv_groups.join(groups, joining, max_groups=3)
    assert [g.request_ids for g in joined] == [["a0", "a1", "e0"], ["b0", "d0"], ["c0"]]
    assert [g.width for g in joined] == [5, 9, 2]


async def test_engine_decodes_rows_in_groups_as_it_would_alone() -> None:
    """Prompts of very different lengths through the engine: rows decode in 3 groups, each as it would alone."""
    engine = make_engine(tiny_llama(seed=3), prefill_chunk_tokens=64, kv_groups=3)
    group_counts: list[int] = []
    fused_step = engine.runner.fused_step

    def recording(groups, chunks):
        group_counts.append(len(groups))
        return fused_step(groups, chunks)

    engine.runner.fused_step = recording  # type: ignore[method-assign]
    try:
        requests = [
            GenerationRequest(prompt(i, n), SamplingParams(max_new_tokens=12)) for i, n in enumerate([3, 40, 9, 70, 20])
        ]
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        group_counts.clear()
        together = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert [tokens_of(events) for events in together] == alone
        assert max(group_counts) == 3, group_counts
    finally:
        engine.shutdown()
