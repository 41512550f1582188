"""The prefix registry: validation, versioned storage and a host-memory LRU.

All methods block (the server calls them from a thread pool) and are
thread-safe. Resolving a cold prefix reads the backend once however many
threads ask for it at the same time (single-flight), verifies its checksum
and fingerprint, and caches it in host memory bounded by tensor bytes.
"""

from __future__ import annotations

import builtins
import logging
import threading
from concurrent.futures import Future

import torch

from prefix_store.artifact import (
    PrefixArtifact,
    PrefixMetadata,
    decode_artifact,
    encode_artifact,
    read_metadata,
    utc_now_iso,
    validate_key_values,
)
from prefix_store.backends.base import PrefixBackend
from prefix_store.errors import CorruptPrefix, InvalidPrefix, PrefixNotFound, PrefixTooLarge
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.ids import validate_task_id, validate_tenant
from prefix_store.lru import ByteLRU

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, int]  # (tenant, task_id, version)

DEFAULT_HOST_CACHE_BYTES = 256 * 2**20
DEFAULT_MAX_VIRTUAL_TOKENS = 512
DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20


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
    ) -> None:
        self.backend = backend
        self.fingerprint = fingerprint
        self.max_virtual_tokens = max_virtual_tokens
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._cache: ByteLRU[CacheKey, PrefixArtifact] = ByteLRU(host_cache_bytes, _artifact_bytes)
        self._inflight: dict[CacheKey, Future[PrefixArtifact]] = {}
        # Bumped by every delete; a load or upload that straddles one does not fill the
        # cache, since a deleted task's version numbers may be reused by a new upload.
        self._deletions = 0
        self.hits = 0
        self.misses = 0  # backend reads done by resolve

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
        validate_key_values(key_values, self.fingerprint, max_virtual_tokens=self.max_virtual_tokens)
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
            if deletions == self._deletions:
                self._cache.put((tenant, task_id, version), PrefixArtifact(kv, metadata))
        return metadata

    def delete(self, tenant: str, task_id: str) -> bool:
        """Delete every version of the task and drop it from the cache; False if it did not exist."""
        validate_tenant(tenant)
        validate_task_id(task_id)
        existed = self.backend.delete(tenant, task_id)
        with self._lock:
            self._deletions += 1
            for key in self._cache.ordered_keys():
                if key[:2] == (tenant, task_id):
                    self._cache.pop(key)
        return existed

    # -- reads ----------------------------------------------------------------

    def resolve(self, tenant: str, task_id: str, version: int | None = None) -> PrefixArtifact:
        """The verified artifact of `version` (latest when None), from the host cache or the backend.

        PrefixNotFound if absent, CorruptPrefix if the stored blob is damaged,
        InvalidPrefix if it was made for another model.
        """
        validate_tenant(tenant)
        validate_task_id(task_id)
        # The latest version may be pruned between listing and reading: look again.
        for _ in range(3):
            v = version if version is not None else self.backend.latest_version(tenant, task_id)
            if v is None:
                break
            try:
                return self._resolve_version((tenant, task_id, v))
            except PrefixNotFound:
                if version is not None:
                    raise
        raise PrefixNotFound(f"prefix {task_id!r} not found")

    def _resolve_version(self, key: CacheKey) -> PrefixArtifact:
        with self._lock:
            cached = self._cache.get(key)
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
            artifact = self._load(key)
        except BaseException as e:
            with self._lock:
                del self._inflight[key]
            future.set_exception(e)
            raise
        with self._lock:
            if deletions == self._deletions:
                self._cache.put(key, artifact)
            del self._inflight[key]
        future.set_result(artifact)
        return artifact

    def _load(self, key: CacheKey) -> PrefixArtifact:
        tenant, task_id, version = key
        blob = self.backend.get(tenant, task_id, version)
        try:
            artifact = decode_artifact(blob)
        except InvalidPrefix as e:
            # We wrote it, so an unreadable stored blob is damage, not bad input.
            raise CorruptPrefix(f"stored prefix {task_id!r} v{version} is unreadable: {e}") from e
        meta = artifact.metadata
        if (meta.tenant, meta.task_id, meta.version) != key:
            raise CorruptPrefix(
                f"stored prefix {task_id!r} v{version} claims to be {meta.tenant}/{meta.task_id} v{meta.version}"
            )
        self._check_fits(meta)
        return artifact

    def _check_fits(self, meta: PrefixMetadata) -> None:
        diffs = meta.fingerprint.differences(self.fingerprint)
        if diffs:
            raise InvalidPrefix(f"prefix {meta.task_id!r} v{meta.version} does not fit this model: " + "; ".join(diffs))

    def info(self, tenant: str, task_id: str) -> PrefixMetadata:
        """Metadata of the latest version (read from the header; tensors are not verified here)."""
        validate_tenant(tenant)
        validate_task_id(task_id)
        version = self.backend.latest_version(tenant, task_id)
        if version is not None:
            with self._lock:
                cached = self._cache.get((tenant, task_id, version))
            if cached is not None:
                return cached.metadata
        blob = self.backend.get(tenant, task_id)
        try:
            return read_metadata(blob)
        except InvalidPrefix as e:
            raise CorruptPrefix(f"stored prefix {task_id!r} is unreadable: {e}") from e

    def stats(self) -> dict[str, int]:
        """Host-cache counters for metrics."""
        with self._lock:
            return {
                "host_cache_entries": len(self._cache),
                "host_cache_bytes": self._cache.used_bytes,
                "host_cache_capacity_bytes": self._cache.capacity_bytes,
                "host_cache_hits": self.hits,
                "host_cache_misses": self.misses,
            }

    def cached_keys(self) -> builtins.list[CacheKey]:
        """(tenant, task_id, version) of the host-cached prefixes, least recently used first."""
        with self._lock:
            return self._cache.ordered_keys()

    def list(self, tenant: str) -> builtins.list[PrefixMetadata]:
        """Metadata of the latest version of each of the tenant's tasks, by task id.

        Tasks deleted meanwhile are skipped; so are unreadable ones (logged).
        """
        validate_tenant(tenant)
        out: builtins.list[PrefixMetadata] = []
        for task_id in self.backend.list_tasks(tenant):
            try:
                out.append(self.info(tenant, task_id))
            except PrefixNotFound:
                continue
            except CorruptPrefix as e:
                logger.warning("skipping %s/%s in listing: %s", tenant, task_id, e)
        return out
