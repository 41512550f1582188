"""Batch filter/concatenate keep every row's KV, mask and positions; the invariant check runs after each."""

from __future__ import annotations

import torch

from server.batch import Batch, RowInfo
from server.sampling import SamplingBatch, SamplingParams

LAYERS, HEADS, DIM = 3, 2, 4


def make_batch(tag: str, real_lengths: list[int], width: int) -> Batch:
    """Rows with distinct, recognisable KV: value = row number + column / 100 (+ layer * 1000)."""
    n = len(real_lengths)
    mask = torch.zeros(n, width, dtype=torch.int64)
    keys, values = [], []
    for layer in range(LAYERS):
        k = torch.zeros(n, HEADS, width, DIM)
        for i, length in enumerate(real_lengths):
            mask[i, width - length :] = 1
            for col in range(width - length, width):
                k[i, :, col, :] = hash((tag, i)) % 997 + col / 100 + layer * 1000
        keys.append(k)
        values.append(-k)
    rows = [RowInfo(f"{tag}{i}", f"prefix-{tag}{i}", 1) for i in range(n)]
    return Batch(
        rows=rows,
        keys=keys,
        values=values,
        attention_mask=mask,
        next_positions=torch.tensor(real_lengths),
        next_input_ids=torch.arange(n),
        sampling=SamplingBatch.from_params([SamplingParams(seed=i) for i in range(n)], torch.device("cpu")),
    )


def real_kv(batch: Batch) -> dict[str, list[torch.Tensor]]:
    """Each request's real (unpadded) KV columns, per layer, keys then values."""
    out = {}
    for i, row in enumerate(batch.rows):
        cols = batch.attention_mask[i].bool()
        width = batch.width  # buffers may hold free columns beyond the batch's width
        out[row.request_id] = [k[i][:, :width][:, cols] for k in batch.keys] + [
            v[i][:, :width][:, cols] for v in batch.values
        ]
    return out


def assert_same_rows(before: dict[str, list[torch.Tensor]], after: Batch) -> None:
    got = real_kv(after)
    for request_id, tensors in got.items():
        for a, b in zip(before[request_id], tensors, strict=True):
            assert torch.equal(a, b), request_id


def test_concatenate_left_pads_and_keeps_rows() -> None:
    a = make_batch("a", [3, 5], width=5)
    b = make_batch("b", [2, 7, 4], width=8)
    before = {**real_kv(a), **real_kv(b)}
    seeds = torch.cat([a.sampling.seed, b.sampling.seed])
    merged = Batch.concatenate([a, b])
    merged.check()
    assert merged.width == 8 and len(merged) == 5
    assert merged.request_ids == ["a0", "a1", "b0", "b1", "b2"]
    assert torch.equal(merged.sampling.seed, seeds)
    assert_same_rows(before, merged)


def test_filter_drops_rows_and_trims_padding_columns() -> None:
    batch = make_batch("x", [2, 9, 3, 4], width=9)
    before = real_kv(batch)
    kept = batch.filter(["x0", "x2", "x3"])
    assert kept is not None
    kept.check()
    assert kept.request_ids == ["x0", "x2", "x3"]
    assert kept.width == 4  # the long row left; columns padded in every kept row are gone
    assert torch.equal(kept.next_positions, torch.tensor([2, 3, 4]))
    assert torch.equal(kept.next_input_ids, torch.tensor([0, 2, 3]))
    assert torch.equal(kept.sampling.seed, torch.tensor([0, 2, 3]))
    assert_same_rows(before, kept)
    assert kept.filter([]) is None


def test_filter_then_concatenate_round_trip() -> None:
    a = make_batch("a", [4, 6], width=6)
    b = make_batch("b", [2, 3], width=3)
    before = {**real_kv(a), **real_kv(b)}
    merged = Batch.concatenate([a, b])
    merged.check()
    kept = merged.filter(["b1", "a0"])
    assert kept is not None
    kept.check()
    assert kept.request_ids == ["a0", "b1"]  # batch order, not the order asked
    assert_same_rows(before, kept)


def _by_request(batch: Batch) -> dict[str, tuple[int, int, int]]:
    """Each row's position, input id and seed, by request: what must follow a row wherever it moves."""
    return {
        r.request_id: (int(p), int(t), int(s))
        for r, p, t, s in zip(batch.rows, batch.next_positions, batch.next_input_ids, batch.sampling.seed, strict=True)
    }


def test_drop_moves_the_last_rows_into_the_freed_slots_in_place() -> None:
    batch = make_batch("d", [4, 3, 4, 2, 4, 3], width=4)
    before, before_rows = real_kv(batch), _by_request(batch)
    buffer = batch.keys[0].data_ptr()
    kept = batch.drop({"d1", "d4"})
    assert kept is not None
    kept.check()
    # d1's slot takes d5, the last row; d4 was beyond the kept rows' slots: nothing to fill.
    assert kept.request_ids == ["d0", "d5", "d2", "d3"]
    assert kept.keys[0].data_ptr() == buffer and kept.keys[0].shape[0] == 4  # the same memory, no copy
    assert_same_rows(before, kept)
    assert _by_request(kept) == {r: before_rows[r] for r in kept.request_ids}
    assert kept.drop(set()) is kept and kept.drop({"nobody"}) is kept


def test_drop_cuts_columns_padded_in_every_kept_row_off_the_front_without_a_copy() -> None:
    batch = make_batch("e", [2, 9, 3, 4], width=9)
    before, before_rows = real_kv(batch), _by_request(batch)
    storage = batch.keys[0].untyped_storage().data_ptr()
    kept = batch.drop({"e1"})  # the long row: its first five columns are padding in every kept row
    assert kept is not None
    kept.check()
    assert kept.request_ids == ["e0", "e3", "e2"] and kept.width == 4  # the width filter gives, rows moved
    assert kept.keys[0].untyped_storage().data_ptr() == storage  # a view of the same buffer
    assert kept.keys[0].shape == (3, HEADS, 4, DIM)
    assert_same_rows(before, kept)
    assert _by_request(kept) == {r: before_rows[r] for r in kept.request_ids}
    # The view grows and takes further drops like any buffer.
    kept.make_room_for_step()
    assert kept.keys[0].shape[2] > kept.width
    again = kept.drop({"e3"})
    assert again is not None
    again.check()
    assert again.request_ids == ["e0", "e2"] and again.width == 3
    assert_same_rows(before, again)


def test_drop_filters_where_padding_would_stay_between_real_columns_or_nothing_is_left() -> None:
    batch = make_batch("g", [5, 4, 2], width=6)
    # g0 holds two real columns, a padding column, then two more: [0, 1, 1, 0, 1, 1]; g2 only the last two.
    batch.attention_mask[0, 3] = 0
    batch.next_positions[0] = 4
    batch.check()
    before = real_kv(batch)
    kept = batch.drop({"g1"})  # column 3 is then padding in every kept row, between real ones
    assert kept is not None
    kept.check()
    assert kept.request_ids == ["g0", "g2"] and kept.width == 4  # filter's order and trim: column 3 is gone
    assert_same_rows(before, kept)
    assert kept.drop({"g0", "g2"}) is None


def test_check_catches_inconsistency() -> None:
    batch = make_batch("c", [2, 3], width=4)
    batch.next_positions = torch.tensor([2, 4])
    try:
        batch.check()
    except AssertionError:
        return
    raise AssertionError("check() accepted a row whose position disagrees with its mask")


def test_from_requests_places_prefixes_and_prompts() -> None:
    from server.batch import NewRequest

    kv = torch.arange(2 * 2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 2, 3, 4)  # [L, 2, H, P=3, d]
    requests = [
        NewRequest("with-prefix", [11, 12], SamplingParams(seed=1), kv, "t/a@1"),
        NewRequest("plain", [21, 22, 23, 24], SamplingParams(seed=2)),
    ]
    batch, inputs = Batch.from_requests(
        requests,
        kv_shape=(2, 2, 4),
        dtype=torch.float32,
        device=torch.device("cpu"),
        place_prefix=lambda r: r.prefix_kv,
    )
    assert batch.request_ids == ["with-prefix", "plain"] and batch.width == 3
    for layer in range(2):  # the prefix fills the row's P slots; the other row's slots stay zero
        assert torch.equal(batch.keys[layer][0, :, :3], kv[layer, 0]) and torch.equal(
            batch.values[layer][0, :, :3], kv[layer, 1]
        )
        assert not batch.keys[layer][1].any()
    assert inputs.input_ids.tolist() == [[0, 0, 11, 12], [21, 22, 23, 24]]
    assert inputs.position_ids.tolist() == [[0, 0, 3, 4], [0, 1, 2, 3]]  # real tokens start at P
    assert inputs.attention_mask.tolist() == [[1, 1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    assert batch.next_positions.tolist() == [3, 0] and batch.sampling.seed.tolist() == [1, 2]
