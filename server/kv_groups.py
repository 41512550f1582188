"""Running rows in a few padded groups of similar lengths, so that little of the KV is padding.

One padded batch pads every row to the longest: with prompts of 8 to 500 tokens and outputs of 16 to 256
(S3's traffic) about 60% of its KV slots are padding, which every decode step reads in attention and every
join copies. Fused steps (server/fused_step.py) attend group by group anyway, so the running rows can be
kept as up to ``max_groups`` padded batches instead of one: the linear layers still see all rows' tokens
in one flat forward, while each group's padding only reaches its own longest row.

A row that finished its prompt joins the group where it adds the fewest padded slots. Adding a row of width w
to a group of n rows and width T costs ``T - w`` slots when w <= T (the row is left-padded), else
``n * (w - T)`` (every row is). It starts a group of its own instead, while fewer than ``max_groups`` exist,
when that least cost is more than ``SLACK_COLUMNS`` per padded row. Groups never merge; one disappears when
its last row leaves, and the next newcomer starts a fresh one.

The slack keeps rows of nearly equal lengths together: a group costs a few small kernels per layer per step
(at batch 32 and ~50 columns, 4 groups made a decode step ~25% slower than one), while a few padded columns
cost next to nothing. A simulation of S3's traffic at 1 request/s put the mean padded share at 0.62 for one
group, 0.26 for 4 and 0.14 for 6 with this slack, and 0.25 / 0.16 without it (an optimal re-partition at every
step would give 0.15 for 4).
"""

from __future__ import annotations

from collections.abc import Sequence

from server.batch import Batch


def added_padding(rows: int, width: int, row_width: int) -> int:
    """Padded slots that adding a row of ``row_width`` columns adds to a group of ``rows`` x ``width``."""
    if row_width <= width:
        return width - row_width
    return rows * (row_width - width)


# Padded columns per padded row below which a row joins an existing group rather than start one.
SLACK_COLUMNS = 64


def choose_group(shapes: Sequence[tuple[int, int]], row_width: int, max_groups: int) -> int | None:
    """Index of the group (given as (rows, width)) that a new row joins, or None to start a group of its own."""
    costs = [added_padding(rows, width, row_width) for rows, width in shapes]
    best = min(range(len(costs)), key=costs.__getitem__, default=None)
    if best is None:
        return None
    # Padding per padded row: the newcomer's own (width - row_width), or each old row's (row_width - width).
    if len(shapes) < max_groups and abs(row_width - shapes[best][1]) > SLACK_COLUMNS:
        return None
    return best


def join(groups: Sequence[Batch], joining: Sequence[Batch], max_groups: int) -> list[Batch]:
    """``groups`` with ``joining`` (batches of rows whose prompts just finished) placed by ``choose_group``.

    Each group is copied (``Batch.concatenate``) at most once, whatever number of rows joins it.
    """
    members: list[list[Batch]] = [[g] for g in groups]
    shapes = [(len(g), g.width) for g in groups]
    for batch in joining:
        index = choose_group(shapes, batch.width, max_groups)
        if index is None:
            members.append([batch])
            shapes.append((len(batch), batch.width))
            continue
        members[index].append(batch)
        rows, width = shapes[index]
        shapes[index] = (rows + len(batch), max(width, batch.width))
    return [Batch.concatenate(m) for m in members]
