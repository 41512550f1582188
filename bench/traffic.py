"""S3 real traffic, the pure parts: the seeded workload, the static-batching queue, and the SLO statistics.

Workload (issue 7): Poisson arrivals at rate λ; prompt lengths log-uniform over [8, 500] tokens and output
lengths log-uniform over [16, 256] tokens (so short requests are common and long ones still occur); each
request's tenant drawn from Zipf(1.0) over 100 tenants (tenant k has weight 1/k), each tenant its own prefix.

SLO, per request: it finished before the run's cap, its time to first token (from its scheduled arrival) is at
most ``ttft_s`` and its mean inter-token latency ((last token - first token) / (tokens - 1)) is at most
``itl_s``. Goodput = requests that met the SLO / the measurement window. Nothing here loads a model.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PROMPT_RANGE = (8, 500)
OUTPUT_RANGE = (16, 256)


@dataclass(frozen=True)
class TrafficRequest:
    index: int
    arrival_s: float  # seconds after the run's start
    tenant: int  # 0 is the most popular
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    itl_s: float = 0.3


def log_uniform_int(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high] whose logarithm is uniform."""
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    return [1.0 / (k**s) for k in range(1, n + 1)]


def make_workload(
    rate: float,
    duration_s: float,
    seed: int = 0,
    *,
    tenants: int = 100,
    zipf_s: float = 1.0,
    prompt_range: tuple[int, int] = PROMPT_RANGE,
    output_range: tuple[int, int] = OUTPUT_RANGE,
) -> list[TrafficRequest]:
    """Requests arriving in [0, duration_s) as a Poisson process of ``rate`` per second.

    Common random numbers: request i has the same tenant and lengths at every rate (separate streams), and its
    arrival is the same unit-rate Poisson sequence scaled by 1/rate, so rates differ only in how dense they are.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    arrivals = random.Random(f"{seed}-arrivals")
    lengths = random.Random(f"{seed}-lengths")
    who = random.Random(f"{seed}-tenants")
    cumulative = list(_accumulate(zipf_weights(tenants, zipf_s)))
    out: list[TrafficRequest] = []
    t = 0.0
    while True:
        t += arrivals.expovariate(1.0) / rate
        if t >= duration_s:
            return out
        tenant = who.choices(range(tenants), cum_weights=cumulative)[0]
        prompt = log_uniform_int(lengths, *prompt_range)
        output = log_uniform_int(lengths, *output_range)
        out.append(TrafficRequest(len(out), t, tenant, prompt, output))


def _accumulate(values: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


class StaticBatcher:
    """Static batching per task: requests queue per tenant; a tenant's queue becomes a batch once it holds
    ``batch_size`` requests, or once its oldest request has waited ``max_wait_s`` (so rare tenants are served).
    Among ready tenants the one whose oldest request arrived first goes next; a batch holds one tenant only.
    """

    def __init__(self, batch_size: int, max_wait_s: float) -> None:
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._queues: dict[int, deque[TrafficRequest]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, request: TrafficRequest) -> None:
        self._queues.setdefault(request.tenant, deque()).append(request)

    def next_batch(self, now: float) -> list[TrafficRequest] | None:
        """The batch to run at ``now`` (seconds on the arrivals' clock), or None while no tenant is ready."""
        ready = [
            (q[0].arrival_s, tenant)
            for tenant, q in self._queues.items()
            if len(q) >= self.batch_size or now - q[0].arrival_s >= self.max_wait_s
        ]
        if not ready:
            return None
        _, tenant = min(ready)
        queue = self._queues[tenant]
        batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
        if not queue:
            del self._queues[tenant]
        return batch

    def next_deadline(self) -> float | None:
        """When the earliest waiting request reaches ``max_wait_s`` (a full queue is ready at once anyway)."""
        heads = [q[0].arrival_s for q in self._queues.values()]
        return min(heads) + self.max_wait_s if heads else None


@dataclass
class Outcome:
    """What one request saw: times in seconds on the run's clock (the arrivals' clock)."""

    request: TrafficRequest
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    prompt_tokens: int | None = None  # as the server counted them, when it says

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.request.arrival_s if self.token_times else math.inf

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def mean_itl_s(self) -> float:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0

    def meets(self, slo: Slo) -> bool:
        return self.finished and self.ttft_s <= slo.ttft_s and self.mean_itl_s <= slo.itl_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics; inf stays inf (a request that never began)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    if xs[hi] == math.inf:
        return math.inf if pos > lo or xs[lo] == math.inf else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(outcomes: Sequence[Outcome], window_s: float, slo: Slo) -> dict[str, Any]:
    """Statistics over the measured requests (those that arrived within the ``window_s`` measurement window).

    TTFT percentiles count a request that never got a token as infinite; ITL percentiles are over all
    inter-token gaps of the measured requests (token level) and over each request's mean (request level).
    Throughput counts finished requests and all tokens they received, per second of window.
    """
    finished = [o for o in outcomes if o.finished]
    gaps = [g for o in outcomes for g in o.itls]
    started = [o for o in outcomes if len(o.token_times) > 1]
    good = sum(o.meets(slo) for o in outcomes)
    ttft = [o.ttft_s for o in outcomes]
    return {
        "requests": len(outcomes),
        "finished": len(finished),
        "good": good,
        "throughput_rps": len(finished) / window_s,
        "tokens_per_s": sum(len(o.token_times) for o in outcomes) / window_s,
        "goodput_rps": good / window_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "request_itl_p99_s": percentile([o.mean_itl_s for o in started], 99),
        # The p99s of the SLO's own per-request quantities: unfinished requests count as misses.
        "p99_meets_slo": percentile([o.ttft_s if o.finished else math.inf for o in outcomes], 99) <= slo.ttft_s
        and percentile([o.mean_itl_s if o.finished else math.inf for o in outcomes], 99) <= slo.itl_s,
    }
