"""The pure parts of S3 (bench/traffic.py): the seeded workload, static batching per task, the SLO statistics."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter

from bench.traffic import (
    OUTPUT_RANGE,
    PROMPT_RANGE,
    Outcome,
    Slo,
    StaticBatcher,
    TrafficRequest,
    make_workload,
    percentile,
    summarize,
)


def test_workload_is_deterministic_per_seed_and_within_ranges() -> None:
    a, b = make_workload(5.0, 200.0, seed=3), make_workload(5.0, 200.0, seed=3)
    assert a == b
    assert a != make_workload(5.0, 200.0, seed=4)
    assert all(PROMPT_RANGE[0] <= r.prompt_tokens <= PROMPT_RANGE[1] for r in a)
    assert all(OUTPUT_RANGE[0] <= r.output_tokens <= OUTPUT_RANGE[1] for r in a)
    assert all(0 <= r.tenant < 100 for r in a)
    assert all(0 <= r.arrival_s < 200.0 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    # Log-uniform: the median is near the geometric mean of the bounds, far below the arithmetic one.
    assert 40 < statistics.median(r.prompt_tokens for r in a) < 90  # sqrt(8 * 500) = 63
    assert 50 < statistics.median(r.output_tokens for r in a) < 80  # sqrt(16 * 256) = 64


def test_rates_share_tenants_and_lengths() -> None:
    slow, fast = make_workload(1.0, 100.0, seed=0), make_workload(2.0, 100.0, seed=0)
    n = len(slow)
    assert [(r.tenant, r.prompt_tokens, r.output_tokens) for r in fast[:n]] == [
        (r.tenant, r.prompt_tokens, r.output_tokens) for r in slow
    ]
    assert all(math.isclose(f.arrival_s * 2, s.arrival_s) for f, s in zip(fast, slow, strict=False))


def test_poisson_rate_and_exponential_gaps() -> None:
    reqs = make_workload(4.0, 1000.0, seed=1)
    assert 3800 < len(reqs) < 4200  # 4000 expected, sd 63
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(reqs)]
    assert 0.23 < statistics.mean(gaps) < 0.27
    # Exponential: P(gap > mean) = 1/e.
    assert 0.34 < sum(g > 0.25 for g in gaps) / len(gaps) < 0.40


def test_zipf_popularity() -> None:
    counts = Counter(r.tenant for r in make_workload(20.0, 1000.0, seed=2))
    total = sum(counts.values())
    harmonic = sum(1 / k for k in range(1, 101))
    assert abs(counts[0] / total - 1 / harmonic) < 0.01  # the top tenant: 19.3% of requests
    assert 1.6 < counts[0] / counts[1] < 2.4  # Zipf(1): weight 1/k
    assert len(counts) == 100


def req(index: int, tenant: int, arrival: float) -> TrafficRequest:
    return TrafficRequest(index, arrival, tenant, 10, 20)


def test_static_batcher_groups_by_task_up_to_batch_size() -> None:
    b = StaticBatcher(batch_size=3, max_wait_s=5.0)
    for i, (tenant, t) in enumerate([(0, 0.0), (1, 0.1), (0, 0.2), (1, 0.3), (0, 0.4), (0, 0.5)]):
        b.add(req(i, tenant, t))
    batch = b.next_batch(0.6)
    assert batch is not None and [r.index for r in batch] == [0, 2, 4]  # full batch of tenant 0, in order
    assert b.next_batch(0.6) is None  # tenant 0 has 1, tenant 1 has 2: neither full, nobody waited 5 s
    assert len(b) == 3


def test_static_batcher_timeout_serves_rare_tasks_oldest_first() -> None:
    b = StaticBatcher(batch_size=8, max_wait_s=1.0)
    b.add(req(0, 5, 0.0))
    b.add(req(1, 7, 0.2))
    b.add(req(2, 7, 0.3))
    assert b.next_deadline() == 1.0
    assert b.next_batch(0.99) is None
    first = b.next_batch(1.25)  # both waited ≥ 1 s; tenant 5's head is older
    assert first is not None and [r.index for r in first] == [0]
    assert b.next_deadline() == 1.2
    second = b.next_batch(1.25)
    assert second is not None and [r.index for r in second] == [1, 2] and {r.tenant for r in second} == {7}
    assert b.next_batch(100.0) is None and b.next_deadline() is None


def test_slo_and_summary() -> None:
    slo = Slo(ttft_s=1.0, itl_s=0.1)
    good = Outcome(req(0, 0, 0.0), [0.5, 0.6, 0.7], finished=True)
    slow_start = Outcome(req(1, 0, 0.0), [1.5, 1.55], finished=True)
    slow_tokens = Outcome(req(2, 0, 0.0), [0.1, 0.4, 0.7], finished=True)
    unfinished = Outcome(req(3, 0, 0.0), [0.1, 0.15], finished=False)
    never = Outcome(req(4, 0, 0.0))
    outs = [good, slow_start, slow_tokens, unfinished, never]
    assert [o.meets(slo) for o in outs] == [True, False, False, False, False]
    s = summarize(outs, window_s=2.0, slo=slo)
    assert s["good"] == 1 and s["finished"] == 3
    assert s["goodput_rps"] == 0.5 and s["throughput_rps"] == 1.5
    assert s["ttft_p99_s"] == math.inf and s["p99_meets_slo"] is False
    assert math.isclose(s["itl_p50_s"], 0.1)
    assert s["p99_meets_slo"] is False
    assert summarize([good], 1.0, slo)["p99_meets_slo"] is True


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert math.isclose(percentile([0.0, 10.0], 99), 9.9)
    assert percentile([1.0, math.inf], 0) == 1.0
    assert percentile([1.0, math.inf], 50) == math.inf
    assert math.isnan(percentile([], 50))
