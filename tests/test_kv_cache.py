"""In-place KV buffers: appends write into free columns, growth keeps what was there."""

from __future__ import annotations

import torch

from server.kv_cache import HEADROOM_COLUMNS, allocate, build_cache, read_cache


def test_append_in_place_then_grow() -> None:
    like = torch.empty(0)
    k = allocate(2, 3, 5, 4, like=like)  # [B=2, H=3, C=5+headroom, d=4]
    v = torch.zeros_like(k)
    k[:, :, :5] = torch.arange(5.0)[None, None, :, None]
    cache = build_cache([k], [v], length=5)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 5 and layer.keys.shape == (2, 3, 5, 4)

    step = torch.full((2, 3, 1, 4), 7.0)
    keys, _ = layer.update(step, step)
    assert keys.shape == (2, 3, 6, 4) and keys.data_ptr() == k.data_ptr()  # no copy: a view of the same buffer
    assert bool((k[:, :, 5] == 7.0).all())

    big = torch.full((2, 3, HEADROOM_COLUMNS + 10, 4), 9.0)
    keys, _ = layer.update(big, big)
    (grown,), _ = read_cache(cache)
    assert grown.shape[2] > k.shape[2] and keys.shape[2] == 6 + HEADROOM_COLUMNS + 10
    assert torch.equal(grown[:, :, :5, 0], torch.arange(5.0).expand(2, 3, 5))  # the old columns survived
    assert bool((grown[:, :, 5] == 7.0).all()) and bool((grown[:, :, 6 : keys.shape[2]] == 9.0).all())
    assert bool((grown[:, :, keys.shape[2] :] == 0).all())  # free room is zeroed
