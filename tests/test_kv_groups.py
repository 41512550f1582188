"""Placement of joining rows into padded groups (server/kv_groups.py): fewest added padded slots, bounded count.

That rows decode correctly in several groups is tested against PEFT in tests/test_fused_step.py and through the
engine in tests/test_engine.py and tests/test_architectures.py.
"""

from __future__ import annotations

import asyncio

import pytest

from server import kv_groups
from server.engine import GenerationRequest
from server.kv_groups import SLACK_COLUMNS, added_padding, choose_group
from server.sampling import SamplingParams
from tests.test_batch import make_batch, real_kv
from tests.test_engine import collect, make_engine, prompt, tokens_of
from tests.tiny_models import tiny_llama


def test_added_padding_pads_the_row_or_every_row_of_the_group() -> None:
    assert added_padding(rows=4, width=10, row_width=7) == 3  # the newcomer is left-padded by 3
    assert added_padding(rows=4, width=10, row_width=10) == 0
    assert added_padding(rows=4, width=10, row_width=12) == 8  # each of the 4 rows gets 2 more columns


def test_a_row_starts_a_group_while_there_is_room_and_no_cheap_fit() -> None:
    assert SLACK_COLUMNS == 64
    assert choose_group([], 9, max_groups=1) is None  # the first row starts the first group
    assert choose_group([(3, 200)], 90, max_groups=2) is None  # 110 padded columns: a group of its own
    assert choose_group([(3, 200)], 150, max_groups=2) == 0  # 50 padded columns: within the slack
    assert choose_group([(3, 100)], 130, max_groups=2) == 0  # 3 rows padded by 30 each: within the slack
    assert choose_group([(3, 100)], 200, max_groups=2) is None  # 3 rows padded by 100 each
    assert choose_group([(3, 200), (2, 90)], 90, max_groups=3) == 1  # an exact fit costs nothing
    assert choose_group([(3, 200)], 9, max_groups=1) == 0  # no room: the only group, whatever it costs


def test_rows_of_nearly_equal_lengths_share_one_group() -> None:
    """A burst of similar prompts (S1): a few columns apart, they stay in one group, so steps stay plain decodes."""
    joining = [make_batch(tag, [n], width=n) for tag, n in [("a", 32), ("b", 33), ("c", 31), ("d", 34)]]
    (group,) = kv_groups.join([], joining, max_groups=4)
    assert group.request_ids == ["a0", "b0", "c0", "d0"]


def test_a_row_joins_the_group_it_pads_least() -> None:
    shapes = [(5, 100), (1, 40), (3, 30)]
    # Width 35: group 0 costs 65, group 1 costs 5, group 2 costs 3 x 5 = 15.
    assert choose_group(shapes, 35, max_groups=3) == 1
    # Width 31: group 2 costs 3 x 1 = 3, group 1 costs 9.
    assert choose_group(shapes, 31, max_groups=3) == 2


# A [30, 250] group; rows of 900, 20, 250 and 800 columns join it.
WIDTHS = [("b", 900), ("c", 20), ("d", 250), ("e", 800)]


@pytest.mark.parametrize("max_groups", [1, 2, 3])
def test_join_keeps_every_row_and_its_kv_within_the_group_bound(max_groups: int) -> None:
    groups = [make_batch("a", [30, 250], width=250)]
    joining = [make_batch(tag, [n], width=n) for tag, n in WIDTHS]
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
    """900 starts a group; 20 too (230 columns short of the first); 250 fits the first exactly; the groups are
    full when 800 comes, and it pads least in 900's."""
    groups = [make_batch("a", [30, 250], width=250)]
    joined = kv_groups.join(groups, [make_batch(tag, [n], width=n) for tag, n in WIDTHS], max_groups=3)
    assert [g.request_ids for g in joined] == [["a0", "a1", "d0"], ["b0", "e0"], ["c0"]]
    assert [g.width for g in joined] == [250, 900, 20]


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
            GenerationRequest(prompt(i, n), SamplingParams(max_new_tokens=12))
            for i, n in enumerate([3, 100, 210, 330, 8])
        ]
        alone = [tokens_of(await collect(engine, r)) for r in requests]
        group_counts.clear()
        together = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert [tokens_of(events) for events in together] == alone
        assert max(group_counts) == 3, group_counts
    finally:
        engine.shutdown()
