"""The vectorised sampler: greedy rows, seeded reproducibility, top-k/top-p truncation, the right distribution."""

from __future__ import annotations

import torch

from server.sampling import LOGPROB_FLOOR, SamplingBatch, SamplingParams, row_uniforms, sample, step_logprobs

CPU = torch.device("cpu")


def batch_of(*params: SamplingParams) -> SamplingBatch:
    return SamplingBatch.from_params(list(params), CPU)


def test_greedy_rows_take_argmax_whatever_the_others_do() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = batch_of(SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams())
    tokens = sample(logits, params)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert params.step.tolist() == [1, 1, 1]


def test_row_draw_depends_only_on_seed_and_step() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    alone = sample(logits, batch_of(SamplingParams(temperature=1.0, seed=42)))
    crowd_logits = torch.cat([torch.randn(5, 1000), logits, torch.randn(2, 1000)])
    crowd = batch_of(
        *[SamplingParams(temperature=0.5, seed=s) for s in range(5)],
        SamplingParams(temperature=1.0, seed=42),
        *[SamplingParams(temperature=2.0, top_k=3, seed=9) for _ in range(2)],
    )
    assert sample(crowd_logits, crowd)[5] == alone[0]


def test_uniforms_are_uniform_and_distinct() -> None:
    seeds = torch.arange(20_000)
    u = row_uniforms(seeds, torch.zeros_like(seeds))
    assert bool(((u >= 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    histogram = torch.histc(u.float(), bins=10, min=0, max=1)
    assert bool(((histogram > 1800) & (histogram < 2200)).all()), histogram
    steps = row_uniforms(torch.full((1000,), 7), torch.arange(1000))
    assert steps.unique().numel() == 1000


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    logits = probs.log().expand(n, 4)
    params = batch_of(*[SamplingParams(temperature=1.0, seed=s) for s in range(n)])
    counts = torch.bincount(sample(logits, params), minlength=4).float() / n
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_top_k_and_top_p_cut_the_tail() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, 4)
    top2 = sample(logits, batch_of(*[SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(n)]))
    assert set(top2.tolist()) == {0, 1}
    # top_p 0.7: the head {0.5, 0.3} reaches it; tokens 2 and 3 never appear.
    nucleus = sample(logits, batch_of(*[SamplingParams(temperature=1.0, top_p=0.7, seed=s) for s in range(n)]))
    assert set(nucleus.tolist()) == {0, 1}
    share_of_first = (nucleus == 0).float().mean().item()
    assert abs(share_of_first - 0.5 / 0.8) < 0.03


def test_min_p_cuts_below_a_share_of_the_likeliest() -> None:
    """min_p 0.25 of 0.5: 0.15 stays, 0.05 goes, and the rest keep their proportions; applied before top-p (whose
    mass is then the kept tokens'), and off for rows without it beside rows with it."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    logits = probs.log().expand(n, 4)
    drawn = sample(logits, batch_of(*[SamplingParams(temperature=1.0, min_p=0.25, seed=s) for s in range(n)]))
    counts = torch.bincount(drawn, minlength=4).float() / n
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015, rtol=0)
    # Renormalised first: {0.5, 0.3} / 0.95 = 0.842 reaches top_p 0.8, so token 2 goes too.
    both = sample(logits, batch_of(*[SamplingParams(temperature=1.0, min_p=0.25, top_p=0.8, seed=s) for s in range(n)]))
    assert set(both.tolist()) == {0, 1}
    mixed = batch_of(*[SamplingParams(temperature=1.0, min_p=0.25 if s % 2 else 0.0, seed=s) for s in range(n)])
    drawn = sample(logits, mixed)
    assert (drawn[1::2] == 3).sum() == 0 and (drawn[0::2] == 3).float().mean() > 0.03


def test_low_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(3000, 3)
    cold = sample(logits, batch_of(*[SamplingParams(temperature=0.05, seed=s) for s in range(3000)]))
    hot = sample(logits, batch_of(*[SamplingParams(temperature=5.0, seed=s) for s in range(3000)]))
    assert (cold == 0).float().mean() > 0.99
    assert 0.25 < (hot == 2).float().mean() < 0.4


def test_filter_and_concatenate_keep_per_row_parameters() -> None:
    a = batch_of(SamplingParams(temperature=0.1, seed=1), SamplingParams(top_k=5, seed=2))
    b = batch_of(SamplingParams(top_p=0.5, seed=3))
    merged = SamplingBatch.concatenate([a, b])
    assert merged.seed.tolist() == [1, 2, 3] and len(merged) == 3
    kept = merged.filter(torch.tensor([0, 2]), [0, 2])
    assert kept.seed.tolist() == [1, 3] and kept.top_p.tolist() == [1.0, 0.5]
    with_min_p = SamplingBatch.concatenate([kept, batch_of(SamplingParams(min_p=0.1, seed=4))])
    assert with_min_p.min_p.tolist() == [0.0, 0.0, torch.tensor(0.1).item()]


def test_a_batch_knows_on_the_host_whether_any_row_samples() -> None:
    """All-greedy batches skip the device check (no host sync); a merge with a sampling row must not."""
    greedy = batch_of(SamplingParams(), SamplingParams())
    assert not greedy.may_sample and not greedy.filter(torch.tensor([1]), [1]).may_sample
    assert not greedy.may_min_p and SamplingBatch.concatenate([greedy, batch_of(SamplingParams(min_p=0.1))]).may_min_p
    hot = batch_of(SamplingParams(temperature=1.0, seed=4))
    merged = SamplingBatch.concatenate([greedy, hot])
    assert merged.may_sample and merged.filter(torch.tensor([0, 2]), [0, 2]).may_sample
    logits = torch.zeros(3, 50)
    logits[:, 7] = 0.5  # every row's argmax is 7; the sampling row draws from a nearly flat distribution
    alone = sample(logits[2:], batch_of(SamplingParams(temperature=1.0, seed=4)))
    assert alone.item() != 7  # seed 4 draws another token, so the merged row below cannot pass as greedy
    assert sample(logits, merged).tolist() == [7, 7, alone.item()]


def test_logprobs_are_the_raw_distributions_whatever_the_pick() -> None:
    """The sampled token's log-probability and the top k, under log-softmax of the raw logits: temperature and
    top-k change the pick, never the reported distribution."""
    logits = torch.randn(3, 80, generator=torch.Generator().manual_seed(5)) * 3
    logits[1] = 0.0
    logits[1, 7] = 0.5  # a nearly flat row: its draw is almost surely not its argmax
    params = batch_of(
        SamplingParams(logprobs=3),
        SamplingParams(temperature=1.5, top_k=40, seed=9, logprobs=0),
        SamplingParams(),  # asks for none: computed with its batch-mates, and ignored downstream
    )
    tokens = sample(logits, params)
    got = params.last_logprobs
    assert got is not None and got.top_ids.shape == (3, 3)  # K = the most any row asked for
    want = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(got.chosen, want.gather(1, tokens[:, None]).squeeze(1))
    for row in range(3):  # the three largest, best first (ids of tied values in any order)
        assert torch.allclose(got.top_values[row], want[row].sort(descending=True).values[:3])
        assert torch.equal(want[row, got.top_ids[row]], got.top_values[row])
    assert tokens[1] != 7 and got.chosen[1] < got.top_values[1, 0]  # seed 9 drew another token


def test_logprobs_json_cannot_hold_are_reported_as_vllm_does() -> None:
    """-inf (a logit of -inf) and NaN (logits a broken prefix made non-finite) come out as -9999.0: JSON has
    neither, and a reply must not fail on them."""
    logits = torch.zeros(2, 5)
    logits[0, 4] = float("-inf")
    logits[1] = float("nan")
    got = step_logprobs(logits, torch.tensor([4, 0]), 5)
    assert got.chosen.tolist() == [LOGPROB_FLOOR, LOGPROB_FLOOR] and LOGPROB_FLOOR == -9999.0
    assert got.top_values[0, -1] == LOGPROB_FLOOR and torch.isfinite(got.top_values).all()


def test_no_logprobs_unless_a_row_asks_and_the_ask_survives_merges() -> None:
    plain = batch_of(SamplingParams(), SamplingParams(temperature=1.0, seed=2))
    sample(torch.randn(2, 30), plain)
    assert plain.max_logprobs == -1 and plain.last_logprobs is None
    asking = batch_of(SamplingParams(logprobs=5))
    merged = SamplingBatch.concatenate([plain, asking])
    assert merged.logprobs_asked == (-1, -1, 5) and merged.max_logprobs == 5
    kept = merged.filter(torch.tensor([2]), [2])
    assert kept.logprobs_asked == (5,) and kept.max_logprobs == 5
    sample(torch.randn(1, 30), kept)
    assert kept.last_logprobs is not None and kept.last_logprobs.top_ids.shape == (1, 5)
    rest = merged.filter(torch.tensor([0, 1]), [0, 1])  # the asking row left: no more log-probabilities
    sample(torch.randn(2, 30), rest)
    assert rest.max_logprobs == -1 and rest.last_logprobs is None
    sample(torch.randn(2, 30), plain)  # a later call sets its own (none), never keeps an older one
    assert plain.last_logprobs is None


def test_penalties_follow_their_rows_through_joins_and_filters() -> None:
    cpu = torch.device("cpu")
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.6]] * 3)
    penalized = SamplingBatch.from_params(
        [SamplingParams(repetition_penalty=4.0), SamplingParams(presence_penalty=3.0)], cpu, [[0], [2]]
    )
    plain = SamplingBatch.from_params([SamplingParams()], cpu, [[0]])
    assert plain.adjustments is None
    # Row 0 saw token 0 in its prompt: 2.0 / 4 = 0.5 loses to token 1. Row 1's presence penalty needs a
    # generated token first: it takes token 0.
    assert sample(logits[:2], penalized).tolist() == [1, 0]
    joined = SamplingBatch.concatenate([penalized, plain])
    assert joined.adjustments is not None and joined.adjustments.rows == (0, 1)
    # Row 0 now also generated token 1: 2.0 / 4 and 1.0 / 4 lose to token 3's 0.6; row 1 pays 3.0
    # for token 0; the joined plain row penalises nothing.
    assert sample(logits, joined).tolist() == [3, 1, 0]
    assert joined.adjustments.generated is not None and joined.adjustments.generated.sum(dim=1).tolist() == [2, 2]
    only_plain = joined.filter(torch.tensor([2]), [2])
    assert only_plain.adjustments is None  # the rows that asked left: no [B, V] work for the rest
    kept = joined.filter(torch.tensor([2, 1]), [2, 1])  # reordered: the asking row is now row 1
    assert kept.adjustments is not None and kept.adjustments.rows == (1,) and kept.adjustments.generated is not None
    assert kept.adjustments.generated[0].tolist() == [True, True, False, False]
    assert sample(logits[:2], kept).tolist() == [0, 3]  # it still pays 3.0 for tokens 0 and 1, which it generated


def test_adjustments_follow_rows_that_a_filter_reorders() -> None:
    cpu = torch.device("cpu")
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.6]] * 2)
    pair = SamplingBatch.from_params(
        [SamplingParams(repetition_penalty=4.0), SamplingParams(presence_penalty=3.0)], cpu, [[0], [2]]
    )
    assert sample(logits, pair).tolist() == [1, 0]
    swapped = pair.filter(torch.tensor([1, 0]), [1, 0])  # both rows ask, in the other order now
    # Row 0 is the presence row (it pays 3.0 for token 0); row 1 the repetition row (tokens 0 and 1 seen).
    assert sample(logits, swapped).tolist() == [1, 3]


def test_sampling_q_positions_at_once_draws_what_q_steps_would() -> None:
    """A speculative step samples each of a row's q positions as the row's next q steps would (same seed, step
    i at position i), greedy and truncated rows alike; rows with state that follows the tokens refuse."""
    import pytest

    counts = [4, 1, 3]  # positions per row: rows draft different numbers of tokens
    params = [SamplingParams(temperature=0.9, seed=7), SamplingParams(), SamplingParams(temperature=1.2, top_p=0.8)]
    logits = torch.randn(sum(counts), 300, generator=torch.Generator().manual_seed(5))  # row after row
    stepwise = batch_of(*params)
    sample(torch.randn(len(params), 300), stepwise)  # one token sampled already: steps start at 1
    at_once = sample(logits, stepwise.at_positions(counts)).tolist()
    starts = [0, 4, 5]
    for i in range(max(counts)):  # step i: the rows with an i-th position
        rows = [r for r, n in enumerate(counts) if n > i]
        keep = torch.tensor(rows)
        drawn = sample(logits[[starts[r] + i for r in rows]], stepwise.filter(keep, rows)).tolist()
        assert drawn == [at_once[starts[r] + i] for r in rows], f"position {i}"
        stepwise.step[keep] += 1  # the filtered copy's steps advanced, not the batch's
    assert stepwise.step.tolist() == [1 + n for n in counts]
    with pytest.raises(ValueError):
        batch_of(SamplingParams(logprobs=1)).at_positions([2])


def test_truncation_among_the_likeliest_candidates_equals_sorting_the_whole_row() -> None:
    """The top-k / top-p head found among the most likely tokens first is the head found on the whole sorted
    row, for peaked rows (head among the candidates) and flat ones (sorted whole), ties included."""
    from server import sampling

    def reference(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sorted_probs = probs.sort(dim=-1, descending=True).values
        kept = sampling._sorted_head_mask(sorted_probs, top_k, top_p).sum(dim=-1)
        return probs.masked_fill(probs < sorted_probs.gather(1, (kept - 1)[:, None]), 0.0)

    generator = torch.Generator().manual_seed(11)
    vocab = 5000
    scales = torch.tensor([8.0, 4.0, 2.0, 0.5, 0.05, 0.0, 6.0, 1.0])[:, None]  # peaked ... flat (all tied)
    probs = torch.softmax(torch.randn(8, vocab, generator=generator) * scales, dim=-1)
    probs[6, 10:20] = probs[6, 9]  # ties around a head's edge
    top_k = torch.tensor([0, 0, 40, 0, 0, 0, 300, 12])
    top_p = torch.tensor([0.9, 0.95, 1.0, 0.99, 0.9, 0.5, 0.8, 0.7])
    got = sampling._truncate(probs, top_k, top_p)
    assert torch.equal(got, reference(probs, top_k, top_p))
    heads = (got > 0).sum(dim=-1)
    assert heads.min() < sampling.TRUNCATION_CANDIDATES < heads.max(), "both paths taken"


def test_a_head_longer_than_the_candidates_is_found_on_the_whole_row() -> None:
    """_truncate looks for each row's top-k / top-p head among the 256 likeliest tokens; a row whose head takes them
    all is sorted whole. A near-flat row (its 0.9 head ~1,800 of 2,000 tokens), a peaked one and a top-k of 300,
    against the head computed on each fully sorted row."""
    from server.sampling import TRUNCATION_CANDIDATES, _truncate

    g = torch.Generator().manual_seed(0)
    vocab = 2000
    flat = torch.rand(vocab, generator=g) + 1
    peaked = (torch.randn(vocab, generator=g) * 8).softmax(-1)
    wide_k = torch.rand(vocab, generator=g).softmax(-1)
    probs = torch.stack([flat / flat.sum(), peaked, wide_k])
    top_k, top_p = torch.tensor([0, 0, 300]), torch.tensor([0.9, 0.9, 1.0])
    got = _truncate(probs, top_k, top_p)
    for row in range(3):
        sorted_probs, order = probs[row].sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        keep = int((mass_before < top_p[row]).sum()) if top_p[row] < 1 else int(top_k[row])
        expected = torch.zeros(vocab, dtype=torch.bool)
        expected[order[:keep]] = True
        assert torch.equal(got[row] > 0, expected), row
        assert torch.equal(got[row][expected], probs[row][expected])  # kept tokens keep their probabilities
    kept = (got > 0).sum(dim=1).tolist()
    assert kept[0] > TRUNCATION_CANDIDATES and kept[1] < TRUNCATION_CANDIDATES and kept[2] == 300


def test_a_rows_distribution_does_not_depend_on_a_min_p_neighbour() -> None:
    """min_p renormalises the rows that ask for it; a row beside one has the very probabilities it has alone
    (it was divided by its own sum too, ~1 but not exactly: an ulp's dependence on its batch-mates)."""
    from server.sampling import _distribution

    plain, with_min_p = SamplingParams(temperature=0.8, top_p=0.95, seed=1), SamplingParams(temperature=1, min_p=0.05)
    alone, together = batch_of(plain), batch_of(plain, with_min_p)
    for seed in range(8):  # softmax sums to 1 exactly for some rows, not for others
        logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(seed))
        alone_probs = _distribution(logits[:1], alone, alone.temperature > 0)
        together_probs = _distribution(logits, together, together.temperature > 0)
        assert torch.equal(together_probs[0], alone_probs[0]), seed
        kept = together_probs[1] > 0
        assert 0 < int(kept.sum()) < 1000 and abs(float(together_probs[1].sum()) - 1) < 1e-5
