"""The prefix registry: validation, versioned storage and a host-memory LRU.

All methods block (the server calls them from a thread pool) and are
thread-safe. Resolving a cold prefix reads the backend once however many
threads ask for it at the same time (single-flight), verifies its checksum
and fingerprint, and caches it in host memory bounded by tensor bytes.

Replicas sharing one store stay coherent two ways: the backend's change
notifications (Redis pub/sub) drop stale entries at once, and resolving the
latest version asks the backend which version that is, an answer reused for
at most `latest_ttl` seconds, so a missed notification cannot serve a stale or
deleted prefix for longer. When the backend is unavailable, a task with a
host-resident version keeps being served from it; anything else raises
StoreUnavailable.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from prefix_store.artifact import (
    PrefixArtifact,
    PrefixMetadata,
    encode_artifact,
    read_metadata,
    utc_now_iso,
    validate_key_values,
)
from prefix_store.backends.base import Invalidation, PrefixBackend
from prefix_store.errors import CorruptPrefix, InvalidPrefix, PrefixNotFound, PrefixTooLarge, StoreUnavailable
from prefix_store.fair_slots import FairSlots
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.ids import validate_task_id, validate_tenant
from prefix_store.listing_cache import ListingCache
from prefix_store.lru import ByteLRU
from prefix_store.piecewise import DEFAULT_PIECE_BYTES, FIRST_READ_BYTES, CpuRunner, read_artifact, run_here

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, int]  # (tenant, task_id, version)
TaskKey = tuple[str, str]  # (tenant, task_id)

DEFAULT_HOST_CACHE_BYTES = 256 * 2**20
DEFAULT_MAX_VIRTUAL_TOKENS = 512
DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
# How long a "latest version is N" answer is reused: bounds how long a replica that
# missed an invalidation can serve a superseded or deleted prefix.
DEFAULT_LATEST_TTL = 0.5
# After a StoreUnavailable, resident prefixes are served without asking the backend
# for this long, so a hung (not refusing) store does not add its timeout to each request.
_STORE_DOWN_HOLD = 1.0
_STORE_DOWN_MESSAGE = "the prefix store failed moments ago; retry shortly"
# Backend loads at once. A load is CPU work (read, sha256, copy: ~20 ms for 9 MB here) on the cores that
# decode; run together, a burst of them stalls the running streams' steps at once, run one after another
# they spread over many steps. 0 = no limit.
DEFAULT_MAX_CONCURRENT_LOADS = 1
# Smaller blobs unpack in well under a millisecond (~0.3 ms for a 10-token prefix of the default model): not
# worth waiting up to a step for a gap, which would cap loads at one per step.
DEFAULT_CPU_WORK_MIN_BYTES = 2**20
# Expired latest-version answers are swept once there are this many.
_LATEST_SWEEP_AT = 4096


def _tenant_of(key: CacheKey) -> str:
    return key[0]


def _artifact_bytes(artifact: PrefixArtifact) -> int:
    kv = artifact.key_values
    return kv.numel() * kv.element_size()


class PrefixRegistry:
    def __init__(
        self,
        backend: PrefixBackend,
        fingerprint: ModelFingerprint,
        *,
        host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
        max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        on_load: Callable[[float], None] | None = None,
        latest_ttl: float = DEFAULT_LATEST_TTL,
        max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS,
        run_cpu_work: CpuRunner | None = None,
        fetch_in: CpuRunner | None = None,
        cpu_work_min_bytes: int = DEFAULT_CPU_WORK_MIN_BYTES,
        load_piece_bytes: int = DEFAULT_PIECE_BYTES,
        serving_dtype: torch.dtype | None = None,
    ) -> None:
        """`serving_dtype`, if given, is the dtype the model runs in: uploads must stay finite in it.

        `on_load`, if given, is called with the seconds each successful backend load took (metrics),
        not counting the wait for one of the `max_concurrent_loads` slots.

        A blob larger than `load_piece_bytes` is read in pieces of that many tensor bytes (see
        prefix_store.piecewise); 0 reads every blob whole. `run_cpu_work`, if given, runs the CPU-bound part of
        each piece (verifying and unpacking, never the fetch itself) for blobs of at least `cpu_work_min_bytes`:
        the server passes the engine's `StepGaps.run` on a CPU device, so a large load takes one piece per
        engine step. `fetch_in`, if given, runs each such piece's fetch and its CPU work together instead (the
        server passes `StepGaps.run_held` when the store is on this machine, where a fetch is CPU too).

        Subscribes to the backend's change notifications; `backend.close()` ends that.
        """
        self.backend = backend
        self.on_load = on_load
        self.fingerprint = fingerprint
        self.max_virtual_tokens = max_virtual_tokens
        self.max_upload_bytes = max_upload_bytes
        self.serving_dtype = serving_dtype
        self._lock = threading.Lock()
        # Keyed by tenant too: a tenant past its share of the budget evicts its own prefixes, not others'.
        self._cache: ByteLRU[CacheKey, PrefixArtifact] = ByteLRU(host_cache_bytes, _artifact_bytes, _tenant_of)
        self._inflight: dict[CacheKey, Future[PrefixArtifact]] = {}
        # Bumped by every delete; a load or upload that straddles one does not fill the
        # cache, since a deleted task's version numbers may be reused by a new upload.
        self._deletions = 0
        self.latest_ttl = latest_ttl
        # (the latest version's metadata, or None; monotonic time asked) per task, for the check on use: a store
        # that lost writes hands numbers out again, so the content (its sha256) is compared, not the number.
        self._latest: dict[TaskKey, tuple[PrefixMetadata | None, float]] = {}
        # Bumped by every change we hear of; a latest-version answer read across one is not kept.
        self._epoch = 0
        # Cached versions to check against the store's header (its sha256) before they are served again. A store
        # that lost writes (restarted empty, failed over to a lagging copy, flushed) hands version numbers out
        # again, so a number alone no longer names one content: filled when the subscriber reconnects (messages
        # may have been missed) and when an upload is announced under a number already cached.
        self._unverified: set[CacheKey] = set()
        # Per fault domain of the store (backend.fault_domain: "" for a single server), when its circuit closes.
        self._store_down_until: dict[str, float] = {}
        self._run_cpu_work = run_cpu_work or run_here
        self._fetch_in = fetch_in
        self._cpu_work_min_bytes = cpu_work_min_bytes
        self._load_piece_bytes = load_piece_bytes
        # Tenants take turns for load slots: one tenant's burst of cold prefixes does not queue others' loads.
        self._load_slots = FairSlots(max_concurrent_loads) if max_concurrent_loads > 0 else None
        self.hits = 0
        self.misses = 0  # backend reads done by resolve
        self.store_fallbacks = 0  # resolves served from the host cache because the backend was unavailable
        self.store_errors = 0  # resolves and loads that found the store unavailable (or refused while it was)
        self._listing = ListingCache()  # headers parsed by earlier listings and checks on use
        backend.subscribe(self._on_invalidation)

    # -- writes ---------------------------------------------------------------

    def upload(self, tenant: str, task_id: str, key_values: torch.Tensor) -> PrefixMetadata:
        """Validate `key_values` [L, 2, H_kv, P, d] and store it as the task's next version.

        A failed upload leaves the previous version in place.
        """
        validate_tenant(tenant)
        validate_task_id(task_id)
        if isinstance(key_values, torch.Tensor):
            nbytes = key_values.numel() * key_values.element_size()
            if nbytes > self.max_upload_bytes:
                raise PrefixTooLarge(f"prefix has {nbytes} bytes of tensors, over the limit of {self.max_upload_bytes}")
        validate_key_values(
            key_values, self.fingerprint, max_virtual_tokens=self.max_virtual_tokens, serving_dtype=self.serving_dtype
        )
        kv = key_values.detach().to("cpu", copy=True).contiguous()  # the caller may mutate theirs
        created_at = utc_now_iso()
        blobs: dict[int, bytes] = {}

        def encode(version: int) -> bytes:
            blobs[version] = encode_artifact(
                kv,
                task_id=task_id,
                tenant=tenant,
                version=version,
                fingerprint=self.fingerprint,
                created_at=created_at,
            )
            return blobs[version]

        with self._lock:
            deletions = self._deletions
        version = self.backend.put(tenant, task_id, encode)
        metadata = read_metadata(blobs[version])
        with self._lock:
            self._forget_latest((tenant, task_id))
            if deletions == self._deletions:
                self._cache.put((tenant, task_id, version), PrefixArtifact(kv, metadata))
                self._unverified.discard((tenant, task_id, version))
        return metadata

    def delete(self, tenant: str, task_id: str) -> bool:
        """Delete every version of the task and drop it from the cache; False if it did not exist."""
        validate_tenant(tenant)
        validate_task_id(task_id)
        existed = self.backend.delete(tenant, task_id)
        with self._lock:
            self._deletions += 1
            self._forget_latest((tenant, task_id))
            self._drop_cached((tenant, task_id))
        return existed

    # -- coherence ------------------------------------------------------------

    def _on_invalidation(self, event: Invalidation) -> None:
        """A backend notification (any thread): drop what it makes stale."""
        with self._lock:
            if event.tenant is None or event.task_id is None:
                # Notifications may have been missed, or the store may have lost writes: ask the backend again
                # before trusting a version, and check each cached one's content before serving it again.
                self._epoch += 1
                self._latest.clear()
                self._unverified = set(self._cache.ordered_keys())
                return
            task = (event.tenant, event.task_id)
            self._forget_latest(task)
            if event.version is None:
                self._deletions += 1
                self._drop_cached(task)
            else:
                # Superseded versions: requests that started on one hold the artifact itself.
                self._drop_cached(task, below=event.version)
                if (*task, event.version) in self._cache:  # ours (this replica's upload), or a reused number
                    self._unverified.add((*task, event.version))

    def _forget_latest(self, task: TaskKey) -> None:
        """Drop the latest-version answer for `task` (lock held)."""
        self._epoch += 1
        self._latest.pop(task, None)

    def _drop_cached(self, task: TaskKey, below: int | None = None) -> None:
        """Drop the task's host-cached versions (only those < `below` if given; lock held)."""
        for key in self._cache.ordered_keys():
            if key[:2] == task and (below is None or key[2] < below):
                self._cache.pop(key)

    def _latest_version(self, tenant: str, task_id: str) -> PrefixMetadata | None:
        """The metadata of the task's latest version (its number, its content's sha256), asking the backend unless
        it answered within `latest_ttl`."""
        task = (tenant, task_id)
        with self._lock:
            known = self._latest.get(task)
            asked = time.monotonic()
            if known is not None and asked - known[1] < self.latest_ttl:
                return known[0]
            epoch = self._epoch
        domain = self.backend.fault_domain(tenant, task_id)
        try:
            latest = self._latest_stored(tenant, task_id)
        except StoreUnavailable as e:
            self._open_circuit(domain, e)
            raise
        self._close_circuit(domain)
        with self._lock:
            if epoch == self._epoch:  # no change was heard of while we asked
                if len(self._latest) >= _LATEST_SWEEP_AT:
                    self._latest = {t: a for t, a in self._latest.items() if asked - a[1] < self.latest_ttl}
                self._latest[task] = (latest, asked)
            if latest is None:
                self._drop_cached(task)  # deleted elsewhere and we missed the notification
        return latest

    def _latest_stored(self, tenant: str, task_id: str) -> PrefixMetadata | None:
        """The latest version's metadata, from its header (one round trip to Redis)."""
        try:
            header = self.backend.get_header(tenant, task_id)
        except PrefixNotFound:
            return None
        try:
            return self._listing.metadata(header)  # parsed once per distinct header: ~150 µs saved a check
        except InvalidPrefix as exc:
            raise CorruptPrefix(f"stored prefix {task_id!r} is unreadable: {exc}") from exc

    def _newest_cached(self, tenant: str, task_id: str) -> PrefixArtifact | None:
        """The newest host-cached version of the task, if any (marks it recently used)."""
        with self._lock:
            versions = [key for key in self._cache.ordered_keys() if key[:2] == (tenant, task_id)]
            if not versions:
                return None
            self.store_fallbacks += 1
            return self._cache.get(max(versions))

    # -- reads ----------------------------------------------------------------

    def resolve(self, tenant: str, task_id: str, version: int | None = None) -> PrefixArtifact:
        """The verified artifact of `version` (latest when None), from the host cache or the backend.

        PrefixNotFound if absent, CorruptPrefix if the stored blob is damaged,
        InvalidPrefix if it was made for another model.
        """
        validate_tenant(tenant)
        validate_task_id(task_id)
        if version is not None:
            return self._resolve_version((tenant, task_id, version))
        if self._circuit_open(self.backend.fault_domain(tenant, task_id)):
            # Circuit open: serve what is resident, and fail cold loads now rather than each waiting out
            # its own store timeout (a burst of them would pile up on the I/O threads).
            if (resident := self._newest_cached(tenant, task_id)) is not None:
                return resident
            raise self._refused_while_down()
        try:
            return self._resolve_latest(tenant, task_id)
        except StoreUnavailable:
            # Keep serving what is resident; it is the newest version this replica knows.
            resident = self._newest_cached(tenant, task_id)
            if resident is None:
                raise
            logger.debug("store unavailable; serving resident %s/%s v%d", tenant, task_id, resident.metadata.version)
            return resident

    def resolve_resident(self, tenant: str, task_id: str) -> PrefixArtifact | None:
        """The latest version's artifact if ``resolve`` would return it without asking the store (host-cached, its
        latest-version answer fresh, nothing to check): no I/O, no waiting, so callers may run it on an event loop.
        None when ``resolve`` has work to do (a load, a check on use, an error to raise)."""
        task = (tenant, task_id)
        with self._lock:
            known = self._latest.get(task)
            if known is None or known[0] is None or time.monotonic() - known[1] >= self.latest_ttl:
                return None
            latest = known[0]
            key = (tenant, task_id, latest.version)
            if key in self._unverified:
                return None
            cached = self._cache.get(key)
            if cached is None or cached.metadata.sha256 != latest.sha256:
                return None
            self.hits += 1
            return cached

    def _resolve_latest(self, tenant: str, task_id: str) -> PrefixArtifact:
        # The latest version may be pruned between asking and reading: ask again.
        for _ in range(3):
            latest = self._latest_version(tenant, task_id)
            if latest is None:
                break
            try:
                return self._resolve_version((tenant, task_id, latest.version), sha256=latest.sha256)
            except PrefixNotFound:
                with self._lock:
                    self._forget_latest((tenant, task_id))
        raise PrefixNotFound(f"prefix {task_id!r} not found")

    def _resolve_version(self, key: CacheKey, sha256: str | None = None) -> PrefixArtifact:
        """``sha256``: the content the store holds under that version now (the check on use), when known."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and sha256 is not None and cached.metadata.sha256 != sha256:
                # The store holds other bytes under this number (it lost writes and handed the number out again,
                # or was replaced by another copy without a message: a Redis demoted to replica in place).
                logger.info("%s/%s v%d is no longer what the store holds; loading it again", *key)
                self._cache.pop(key)
                cached = None
            unverified = key in self._unverified
        if cached is not None and unverified:
            cached = self._still_stored(key, cached)
        with self._lock:
            if cached is not None:
                self.hits += 1
                return cached
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                future = self._inflight[key] = Future()
                self.misses += 1
            deletions = self._deletions
        if not leader:
            return future.result()  # re-raises the leader's error
        try:
            artifact = self._load_in_turn(key)
        except BaseException as e:
            with self._lock:
                del self._inflight[key]
            future.set_exception(e)
            raise
        with self._lock:
            if deletions == self._deletions:
                self._cache.put(key, artifact)
                self._unverified.discard(key)
            del self._inflight[key]
        future.set_result(artifact)
        return artifact

    def _still_stored(self, key: CacheKey, cached: PrefixArtifact) -> PrefixArtifact | None:
        """``cached`` if the store still holds that content under its version (the header's sha256 agrees), else
        None, with the stale copy dropped. StoreUnavailable if the store cannot say (resolve then serves what is
        resident, as in any outage)."""
        tenant, task_id, version = key
        try:
            stored = self._listing.metadata(self.backend.get_header(tenant, task_id, version)).sha256
        except StoreUnavailable as e:
            self._open_circuit(self.backend.fault_domain(tenant, task_id), e)
            raise
        except (PrefixNotFound, InvalidPrefix):
            stored = None
        with self._lock:
            self._unverified.discard(key)
            if stored == cached.metadata.sha256:
                return cached
            if self._cache.get(key) is cached:
                self._cache.pop(key)
        logger.warning("%s/%s v%d is no longer what the store holds under that version number", *key)
        return None

    def _open_circuit(self, domain: str | None, error: StoreUnavailable) -> None:
        """The store (its part `domain`; None: no part can be blamed) just failed: for ``_STORE_DOWN_HOLD`` seconds,
        serve what is resident and fail cold loads there, unless it answered with an error at once (then the
        next request asks again: its answer costs no timeout, and ends as soon as the store recovers)."""
        with self._lock:
            if domain is not None and not error.answered:
                self._store_down_until[domain] = time.monotonic() + _STORE_DOWN_HOLD
            self.store_errors += 1

    def _refused_while_down(self) -> StoreUnavailable:
        """The error for a lookup or load refused while the circuit is open, counted as one that found the store
        unavailable (it did: the operator's error rate and alert see every request the outage refused)."""
        with self._lock:
            self.store_errors += 1
        return StoreUnavailable(_STORE_DOWN_MESSAGE)

    def _close_circuit(self, domain: str | None) -> None:
        """The store's part `domain` answered: cold loads may try it again."""
        with self._lock:
            if domain is not None:
                self._store_down_until.pop(domain, None)

    def _circuit_open(self, domain: str | None) -> bool:
        if domain is None:
            return False
        with self._lock:
            return time.monotonic() < self._store_down_until.get(domain, 0.0)

    def _load_in_turn(self, key: CacheKey) -> PrefixArtifact:
        """``_load`` once a load slot is free; StoreUnavailable at once if the store failed while we waited."""
        domain = self.backend.fault_domain(key[0], key[1])
        with self._load_slots.slot(key[0]) if self._load_slots is not None else contextlib.nullcontext():
            if self._circuit_open(domain):
                # Loads queued behind one that found the store hung must not each wait out a timeout.
                raise self._refused_while_down()
            started = time.perf_counter()
            try:
                artifact = self._load(key)
            except StoreUnavailable as e:
                self._open_circuit(domain, e)
                raise
            if self.on_load is not None:
                self.on_load(time.perf_counter() - started)
            return artifact

    def _load(self, key: CacheKey) -> PrefixArtifact:
        tenant, task_id, version = key
        reader = self.backend.open_blob(tenant, task_id, version, FIRST_READ_BYTES)
        try:
            big = reader.size >= self._cpu_work_min_bytes
            run_cpu = self._run_cpu_work if big else run_here
            fetch_in = self._fetch_in if big else None
            artifact = read_artifact(reader, piece_bytes=self._load_piece_bytes, run_cpu=run_cpu, fetch_in=fetch_in)
        except InvalidPrefix as e:
            # We wrote it, so an unreadable stored blob is damage, not bad input.
            raise CorruptPrefix(f"stored prefix {task_id!r} v{version} is unreadable: {e}") from e
        finally:
            reader.close()
        meta = artifact.metadata
        if (meta.tenant, meta.task_id, meta.version) != key:
            raise CorruptPrefix(
                f"stored prefix {task_id!r} v{version} claims to be {meta.tenant}/{meta.task_id} v{meta.version}"
            )
        self._check_fits(meta)
        return artifact

    def fits_model(self, meta: PrefixMetadata) -> bool:
        """Whether a stored prefix was made for this registry's model (one that was not is never served)."""
        return not meta.fingerprint.differences(self.fingerprint)

    def _check_fits(self, meta: PrefixMetadata) -> None:
        diffs = meta.fingerprint.differences(self.fingerprint)
        if diffs:
            raise InvalidPrefix(f"prefix {meta.task_id!r} v{meta.version} does not fit this model: " + "; ".join(diffs))

    def info(self, tenant: str, task_id: str) -> PrefixMetadata:
        """Metadata of the latest version (read from the header; tensors are not verified here)."""
        validate_tenant(tenant)
        validate_task_id(task_id)
        latest = self._latest_version(tenant, task_id)
        if latest is None:
            raise PrefixNotFound(f"prefix {task_id!r} not found (any version)")
        return latest

    def stats(self) -> dict[str, int]:
        """Host-cache counters for metrics."""
        with self._lock:
            return {
                "host_cache_entries": len(self._cache),
                "host_cache_bytes": self._cache.used_bytes,
                "host_cache_capacity_bytes": self._cache.capacity_bytes,
                "host_cache_hits": self.hits,
                "host_cache_misses": self.misses,
                "host_cache_evictions": self._cache.evictions,
                "store_fallbacks": self.store_fallbacks,
                "store_errors": self.store_errors,
            }

    def loads_waiting(self) -> int:
        """Loads waiting for one of the `max_concurrent_loads` slots."""
        return 0 if self._load_slots is None else self._load_slots.waiting()

    def cached_keys(self) -> builtins.list[CacheKey]:
        """(tenant, task_id, version) of the host-cached prefixes, least recently used first."""
        with self._lock:
            return self._cache.ordered_keys()

    def list(self, tenant: str) -> builtins.list[PrefixMetadata]:
        """Metadata of the latest version of each of the tenant's tasks, by task id.

        Tasks deleted meanwhile are skipped; so are unreadable ones (logged).
        """
        validate_tenant(tenant)
        domain = self.backend.fault_domain(tenant)  # a listing's: on a cluster, no one node
        try:
            task_ids = self.backend.list_tasks(tenant)
            headers = self.backend.latest_headers(tenant, task_ids)  # batched where the store allows
        except StoreUnavailable as e:
            self._open_circuit(domain, e)
            raise
        self._close_circuit(domain)
        out: builtins.list[PrefixMetadata] = []
        for task_id in task_ids:
            header = headers.get(task_id)
            if header is None:  # deleted since it was listed
                continue
            try:
                out.append(self._listing.metadata(header))
            except InvalidPrefix as e:
                logger.warning("skipping %s/%s in listing: stored prefix is unreadable: %s", tenant, task_id, e)
        return out
