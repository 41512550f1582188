"""Prometheus metrics: the families, the HTTP middleware that counts requests, and GET /metrics.

Each app owns its own ``CollectorRegistry`` (tests build many apps in one
process; the global default registry would refuse the second). Three kinds of
sources feed it:

* the engine thread pushes per-forward-pass and per-token observations through
  ``EngineMetrics`` (plain histogram/counter updates, no label lookups, no
  device work: the figures come from values the engine already has on the host);
* the ASGI middleware counts finished HTTP requests by route template;
* everything that is a level rather than an event (queue depth, cache
  occupancy, the registry's hit/miss/eviction counters, CUDA memory) is read at
  scrape time by ``_StateCollector``, so it costs nothing between scrapes.

By default no label carries a task id or tenant: their number is unbounded.
``--metrics-task-labels N`` adds a ``task`` label ("tenant/task_id") to the
request, token and time-to-first-token families; ``TaskLabels`` gives the first
N tasks seen their own value (no tenant more than half of them) and counts every
later one under ``other``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store.errors import InvalidTaskId
from prefix_store.ids import shown, validate_task_id
from server.errors import Forbidden
from server.request_log import RequestRecord, current_request, log_request, new_request_id

# No ``*_created`` series beside every counter and histogram (the time each was made, which prometheus_client adds
# by default): they nearly double what is scraped and say nothing a dashboard uses.
disable_created_metrics()

if TYPE_CHECKING:
    from server.api.state import ServerState
    from server.batch import RowInfo
    from server.engine import GenerationRequest

# PUTs under this path are uploads, also counted in prefix_serve_prefix_uploads_total. Matched on the raw
# path (the body-limit middleware's rule), so a 413 answered before routing still counts as an upload.
UPLOAD_PATH_PREFIX = "/v1/prefixes/"
# Requests no route handled (404s, bodies refused before routing): one label value however many paths are probed.
UNMATCHED_ENDPOINT = "unmatched"
# The ``method`` label's values: any other method a client makes up is counted as OTHER_METHOD (each would be a
# series of its own, and they are refused before authentication).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
# The status a response that started but never finished is counted and logged under, without an exception: the
# client left mid-stream (nginx's 499, as for one that leaves before the answer).
CLIENT_CLOSED = 499

# Bucket edges. Batch sizes and prefix counts are small integers; latencies span a cached
# tiny model on CPU (milliseconds) to a long generation (minutes; requests up to the default
# --request-timeout-s of 600 s).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
DISTINCT_PREFIX_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
PADDING_RATIO_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
STEP_PROMPT_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_Family = TypeVar("_Family", bound=MetricWrapperBase)

# Values of the opt-in ``task`` label besides "tenant/task_id". A task's value always holds a slash
# (task ids cannot), so none of these can collide with a task.
BASE_TASK = "base"  # generations without a prefix; never takes one of the N slots
OTHER_TASK = "other"  # every task seen after the first N
NO_TASK = ""  # requests that reached no generation (other routes, refused early); Prometheus reads "" as no label


class TaskLabels:
    """Which tasks get a ``task`` label value of their own: the first ``limit`` seen since the server started.

    The named set only grows and never past ``limit``, so the label has at most
    ``limit`` + 3 values whatever the traffic. A deleted task keeps its slot (its
    counters must stay monotonic) and a task uploaded again under the same id
    reuses it. Called from the engine thread and the HTTP threads alike.

    A tenant takes a slot only while it holds fewer than are still free, so no
    tenant ever holds more than half of them, and a tenant new to the server gets
    one as long as any is left: one tenant's many tasks cannot leave every other
    tenant's traffic under ``other``.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the number of labelled tasks must be positive, not {limit}")
        self.limit = limit
        self._named: set[str] = set()
        self._held: dict[str, int] = {}  # slots per tenant
        self._lock = threading.Lock()

    def value(self, task: str | None) -> str:
        """The label value of ``task`` ("tenant/task_id"; None for the base model), claiming a free slot."""
        if task is None:
            return BASE_TASK
        # Unlocked reads are safe: the set only grows, and once full it never changes again.
        if task in self._named:
            return task
        if len(self._named) >= self.limit:
            return OTHER_TASK
        tenant = task.rpartition("/")[0]  # task ids hold no slash; a tenant name might
        with self._lock:
            free = self.limit - len(self._named)
            if task not in self._named and self._held.get(tenant, 0) < free:
                self._named.add(task)
                self._held[tenant] = self._held.get(tenant, 0) + 1
            return task if task in self._named else OTHER_TASK

    def of_prefix(self, prefix_id: str | None) -> str:
        """The label value of an engine prefix id, "tenant/task@version#sha" (all versions share the task's value)."""
        return self.value(None if prefix_id is None else prefix_id.rpartition("@")[0])


class EngineMetrics:
    """What the engine thread records, per forward pass and per emitted token.

    Every method is a handful of Python operations plus one lock per observation;
    nothing here reads a tensor (see bench/metrics_overhead.py for the cost).
    With ``tasks`` the token counters and time to first token carry a ``task`` label.
    """

    def __init__(self, registry: CollectorRegistry, tasks: TaskLabels | None = None) -> None:
        self.tasks = tasks
        by_task = ["task"] if tasks is not None else []
        self.prompt_tokens = Counter(
            "prefix_serve_prompt_tokens", "Prompt tokens prefilled.", by_task, registry=registry
        )
        self.generated_tokens = Counter(
            "prefix_serve_generated_tokens", "Tokens generated and handed to requests.", by_task, registry=registry
        )
        self.prompt_cache_hit_tokens = Counter(
            "prefix_serve_prompt_cache_hit_tokens",
            "Prompt tokens whose K/V came from the prompt cache instead of being computed (part of prompt_tokens).",
            registry=registry,
        )
        # vLLM's spec_decode num_draft_tokens / num_accepted_tokens: their ratio is the drafts' acceptance rate.
        self.speculative_draft_tokens = Counter(
            "prefix_serve_speculative_draft_tokens",
            "Draft tokens proposed by prompt lookup and verified in decode steps (speculative decoding).",
            registry=registry,
        )
        self.speculative_accepted_tokens = Counter(
            "prefix_serve_speculative_accepted_tokens",
            "Draft tokens the verifying forward confirmed: tokens gained beyond one per row and step.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "prefix_serve_batch_size",
            "Rows per forward pass (prefill and decode).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.distinct_prefixes = Histogram(
            "prefix_serve_batch_distinct_prefixes",
            "Distinct prefixes (task versions) per forward pass; rows without a prefix are not counted.",
            buckets=DISTINCT_PREFIX_BUCKETS,
            registry=registry,
        )
        self.padding_ratio = Histogram(
            "prefix_serve_batch_padding_ratio",
            "Share of the batch's KV slots that are padding in a forward pass.",
            buckets=PADDING_RATIO_BUCKETS,
            registry=registry,
        )
        self.step_prompt_tokens = Histogram(
            "prefix_serve_step_prompt_tokens",
            "Prompt tokens fed into one decode step beside running rows (chunked prefill), chunk overheads not "
            "counted; fewer while prompts are paced.",
            buckets=STEP_PROMPT_TOKEN_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "prefix_serve_time_to_first_token_seconds",
            "From entering the engine's queue (after tokenisation and prefix lookup) to the first token.",
            by_task,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "prefix_serve_inter_token_latency_seconds",
            "Time between consecutive steps that gave one request tokens (a speculative step's several: one gap).",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[MetricWrapperBase, str], MetricWrapperBase] = {}

    def forward_pass(self, rows: Sequence[RowInfo], slots: int, real_slots: int) -> None:
        """One forward pass over ``rows`` whose padded KV has ``slots`` token slots, ``real_slots`` of them unmasked.

        ``slots`` is rows x width summed over the running groups; ``real_slots`` is the sum of the rows' next
        positions: by the batch invariant it equals ``attention_mask.sum()``, so the padding ratio needs no
        mask reduction.
        """
        n = len(rows)
        if n == 0:
            return
        self.batch_size.observe(n)
        self.distinct_prefixes.observe(len({r.prefix_id for r in rows if r.prefix_id is not None}))
        self.padding_ratio.observe(1.0 - real_slots / slots)

    def prefilled(self, requests: Iterable[GenerationRequest]) -> None:
        """The prompts of one prefill."""
        if self.tasks is None:
            self.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
            return
        counts: dict[str | None, int] = {}
        for r in requests:
            counts[r.prefix_id] = counts.get(r.prefix_id, 0) + len(r.prompt_ids)
        self._inc_per_task(self.prompt_tokens, counts)

    def generated(self, rows: Sequence[RowInfo]) -> None:
        """One token for each of ``rows`` this step: one increment per task label, not per row."""
        if self.tasks is None:
            self.generated_tokens.inc(len(rows))  # once per step: one lock instead of B
            return
        counts: dict[str | None, int] = {}
        for r in rows:
            counts[r.prefix_id] = counts.get(r.prefix_id, 0) + 1
        self._inc_per_task(self.generated_tokens, counts)

    def first_token(self, prefix_id: str | None, seconds: float) -> None:
        if self.tasks is None:
            self.time_to_first_token.observe(seconds)
        else:
            self._child(self.time_to_first_token, self.tasks.of_prefix(prefix_id)).observe(seconds)

    def _inc_per_task(self, family: Counter, per_prefix: dict[str | None, int]) -> None:
        """Sum counts by label value (several prefix versions or "other" tasks share one), then one inc each."""
        assert self.tasks is not None
        per_label: dict[str, int] = {}
        for prefix_id, n in per_prefix.items():
            label = self.tasks.of_prefix(prefix_id)
            per_label[label] = per_label.get(label, 0) + n
        for label, n in per_label.items():
            self._child(family, label).inc(n)

    def _child(self, family: _Family, label: str) -> _Family:
        # ``labels()`` validates, builds a tuple and takes the family's lock; the decode loop skips that.
        # At most (N + 2) values per family; children are never removed, so the cache cannot go stale.
        child = self._children.get((family, label))
        if child is None:
            child = self._children[(family, label)] = family.labels(label)
        return child  # type: ignore[return-value]  # cached under its own family, so of the same type


class ServerMetrics:
    """All metrics of one app instance, on a registry of its own.

    ``task_labels`` > 0 turns the ``task`` label on for that many tasks (``TaskLabels``).
    """

    def __init__(self, task_labels: int = 0) -> None:
        self.tasks = TaskLabels(task_labels) if task_labels else None
        self.registry = CollectorRegistry()
        # prometheus_client registers these on its global registry at import; ours get their own.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "prefix_serve_requests",
            "Finished HTTP requests by route template and status code.",
            ["method", "endpoint", "status"] + (["task"] if self.tasks is not None else []),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "prefix_serve_request_duration_seconds",
            "End-to-end HTTP request latency, until the last byte (streams included).",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.uploads = Counter(
            "prefix_serve_prefix_uploads",
            "Prefix uploads by HTTP status code.",
            ["status"],
            registry=self.registry,
        )
        self.prefix_load = Histogram(
            "prefix_serve_prefix_load_seconds",
            "Cold prefix loads: backend read, decode and verification.",
            ["source"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Info("prefix_serve_model", "The served base model.", registry=self.registry)
        self.engine = EngineMetrics(self.registry, self.tasks)
        self._state = _StateCollector()
        self.registry.register(self._state)

    def bind(self, state: ServerState) -> None:
        """Attach the started server: its model, engine and prefix registry are read at scrape time."""
        model = state.model
        self.model_info.info(
            {
                "model": model.name,
                "dtype": str(model.dtype).removeprefix("torch."),
                "device": str(model.device),
                "num_layers": str(model.num_layers),
            }
        )
        self._state.state = state

    def load_observer(self, source: str) -> Callable[[float], None]:
        """The callback the prefix registry calls with each cold load's duration."""
        return self.prefix_load.labels(source=source).observe

    def observe_request(
        self, method: str, path: str, endpoint: str, status: int, seconds: float, record: RequestRecord | None = None
    ) -> None:
        code = str(status)
        method = method if method in HTTP_METHODS else OTHER_METHOD
        if self.tasks is None:
            self.requests.labels(method, endpoint, code).inc()
        else:
            self.requests.labels(method, endpoint, code, self._task_of(record)).inc()
        self.request_duration.labels(endpoint).observe(seconds)
        if method == "PUT" and path.startswith(UPLOAD_PATH_PREFIX):
            self.uploads.labels(code).inc()

    def _task_of(self, record: RequestRecord | None) -> str:
        """The ``task`` value of a finished request: its generation's task, or NO_TASK if it generated nothing."""
        assert self.tasks is not None
        # The request gate notes the generation (tenant, task, token counts) once the prefix has resolved and
        # the request goes to the engine; requests refused before that (bad input, unknown task, quota), or
        # by the engine before a token, never claim a slot, so made-up task ids cannot use the slots up.
        if record is None or not record.generated_tokens:
            return NO_TASK
        return self.tasks.value(None if record.task_id is None else f"{record.tenant}/{record.task_id}")

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _StateCollector(Collector):
    """Levels and counters owned by other objects, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.state: ServerState | None = None

    def describe(self) -> Iterator[Metric]:
        # Declares the names to the registry (duplicate detection) before any server is bound.
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.state)

    @staticmethod
    def _families(state: ServerState | None) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "prefix_serve_queue_depth", "Requests waiting for admission (or first for their prefix to load)."
        )
        running = GaugeMetricFamily("prefix_serve_running_requests", "Requests in the decoding batch.")
        hits = CounterMetricFamily(
            "prefix_serve_prefix_cache_hits", "Prefix lookups served by a tier.", labels=["tier"]
        )
        misses = CounterMetricFamily(
            "prefix_serve_prefix_cache_misses", "Prefix lookups that missed a tier.", labels=["tier"]
        )
        evictions = CounterMetricFamily(
            "prefix_serve_prefix_cache_evictions", "Prefixes evicted from a tier for space.", labels=["tier"]
        )
        used = GaugeMetricFamily("prefix_serve_prefix_cache_bytes", "Tensor bytes cached per tier.", labels=["tier"])
        capacity = GaugeMetricFamily(
            "prefix_serve_prefix_cache_capacity_bytes", "Byte budget of each tier.", labels=["tier"]
        )
        resident = GaugeMetricFamily("prefix_serve_prefixes_resident", "Prefixes cached per tier.", labels=["tier"])
        prompt_cache = GaugeMetricFamily(
            "prefix_serve_prompt_cache_bytes", "Tensor bytes of prompt heads' K/V kept by the prompt cache."
        )
        store_errors = CounterMetricFamily(
            "prefix_serve_store_errors", "Prefix lookups and loads that found the prefix store unavailable."
        )
        store_fallbacks = CounterMetricFamily(
            "prefix_serve_store_fallbacks", "Prefix lookups served from memory because the store was unavailable."
        )
        if state is not None:
            store = state.registry.stats()
            store_errors.add_metric([], store["store_errors"])
            store_fallbacks.add_metric([], store["store_fallbacks"])
            cache = state.engine.prompt_cache
            prompt_cache.add_metric([], 0 if cache is None else cache.bytes)
            queue.add_metric([], state.engine.num_waiting + state.awaiting_prefix)
            running.add_metric([], state.engine.num_running)
            tiers = [("host", state.registry.stats())]
            device_cache = state.engine.runner.prefix_cache
            if device_cache.enabled:  # on CPU the host tier is the device tier
                tiers.append(("device", device_cache.stats()))
            for tier, stats in tiers:
                hits.add_metric([tier], stats[f"{tier}_cache_hits"])
                misses.add_metric([tier], stats[f"{tier}_cache_misses"])
                evictions.add_metric([tier], stats[f"{tier}_cache_evictions"])
                used.add_metric([tier], stats[f"{tier}_cache_bytes"])
                capacity.add_metric([tier], stats[f"{tier}_cache_capacity_bytes"])
                resident.add_metric([tier], stats[f"{tier}_cache_entries"])
        yield from (queue, running, hits, misses, evictions, used, capacity, resident, prompt_cache)
        yield from (store_errors, store_fallbacks)
        if state is not None and state.model.device.type == "cuda":
            yield from _cuda_memory(state.model.device)


def _cuda_memory(device: torch.device) -> Iterator[Metric]:
    """The caching allocator's counters: host-side bookkeeping, no device sync."""
    label = [str(device)]
    allocated = GaugeMetricFamily(
        "prefix_serve_cuda_memory_allocated_bytes", "Bytes held by tensors.", labels=["device"]
    )
    allocated.add_metric(label, torch.cuda.memory_allocated(device))
    reserved = GaugeMetricFamily(
        "prefix_serve_cuda_memory_reserved_bytes", "Bytes reserved by the caching allocator.", labels=["device"]
    )
    reserved.add_metric(label, torch.cuda.memory_reserved(device))
    peak = GaugeMetricFamily(
        "prefix_serve_cuda_memory_peak_allocated_bytes", "Peak bytes held by tensors.", labels=["device"]
    )
    peak.add_metric(label, torch.cuda.max_memory_allocated(device))
    yield from (allocated, reserved, peak)


class MetricsMiddleware:
    """Counts every finished HTTP request by method, route template and status, times it, and logs it.

    Each request gets an id (the client's X-Request-ID when plain, else a fresh
    one), echoed in the response's X-Request-ID header and in its log line.

    Pure ASGI rather than BaseHTTPMiddleware: it must see streamed responses to
    their last byte, and it must sit outside the body-limit middleware to count
    the 413s that never reach a route.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server error middleware answers if the app raises
        finished = False  # the response's last body message was sent
        sent_id = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        record = RequestRecord(new_request_id(sent_id), scope["method"], scope["path"], started=started)
        token = current_request.set(record)

        async def send_and_record_status(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"x-request-id", record.request_id.encode())]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_and_record_status)
        except BaseException as exc:
            error = exc
            raise
        finally:
            current_request.reset(token)
            endpoint = _endpoint(scope)
            if record.task_id is None:  # prefix routes name the task in the path
                record.task_id = _task_in_path(scope)
            # A stream fails after its 200 went out: counted under what its error event says (or, cut off, as the
            # client leaving or a server error), so error rates and alerts see it.
            if record.stream_error is not None:
                status = record.stream_error
            elif status < 400 and not finished:
                client_left = error is None or isinstance(error, (ClientDisconnect, OSError, asyncio.CancelledError))
                status = CLIENT_CLOSED if client_left else 500
            seconds = time.perf_counter() - started
            self.metrics.observe_request(scope["method"], scope["path"], endpoint, status, seconds, record)
            log_request(record, endpoint, status)


def _task_in_path(scope: Scope) -> str | None:
    """The task id a prefix route's path names, for the log line: as sent if it is a valid id, else quoted and cut
    short (a line break or any other character in it must not start a forged line of a text log)."""
    task_id = scope.get("path_params", {}).get("task_id")
    if not isinstance(task_id, str):
        return None
    try:
        return validate_task_id(task_id)
    except InvalidTaskId:
        return shown(task_id)


def _endpoint(scope: Scope) -> str:
    """The template of the route that handled the request ("/v1/prefixes/{task_id}"), never the raw path.

    Starlette's router (and FastAPI's, for included routers) leaves the selected
    route in the scope, 405s included; read it after the app has run.
    """
    path = getattr(scope.get("route"), "path", None)
    # "{task_id:anytext}" (a converter that lets the router match ids with slashes, to refuse them) reads "{task_id}".
    return _CONVERTER.sub(r"{\1}", path) if isinstance(path, str) else UNMATCHED_ENDPOINT


_CONVERTER = re.compile(r"\{(\w+):\w+\}")


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    exported: ServerMetrics = request.app.state.metrics
    state: ServerState | None = getattr(request.app.state, "server", None)
    # The task label names every tenant's tasks, which no tenant's own routes show another (they answer 404 as for
    # a task that does not exist): with keys, only an admin key may read it.
    labelled = exported.tasks is not None and state is not None and state.keys.enabled
    if labelled and not state.keys.authenticate(request.headers.get("authorization")).admin:
        raise Forbidden(
            "with --metrics-task-labels, /metrics needs an admin key: its task label names every tenant's tasks"
        )
    body, content_type = exported.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)
