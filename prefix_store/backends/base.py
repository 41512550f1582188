"""The small interface every prefix backend implements.

Blobs are encoded artifacts (see prefix_store.artifact); backends store bytes
and version numbers and never look inside.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from prefix_store.errors import PrefixNotFound, StoreUnavailable

# How long a tenant_lock waits for another process's upload before giving up (StoreUnavailable: 503, try again).
TENANT_LOCK_WAIT_S = 10.0


def wait_for_lock(acquire: Callable[[], bool], what: str, wait_s: float) -> None:
    """Try ``acquire`` every 10 ms until it returns True; StoreUnavailable once ``wait_s`` have passed."""
    deadline = time.monotonic() + wait_s
    while not acquire():
        if time.monotonic() > deadline:
            raise StoreUnavailable(f"{what} was held elsewhere for over {wait_s:g} s")
        time.sleep(0.01)


@dataclass(frozen=True)
class Invalidation:
    """A change to the store by any replica: a new `version` of a task, or its deletion (version None).

    tenant and task_id None means "messages may have been missed" (the
    subscription was re-established): drop anything derived from the store.
    """

    tenant: str | None
    task_id: str | None
    version: int | None


class BlobReader(ABC):
    """One stored version's blob, read in byte ranges (the registry reads large blobs in pieces).

    ``size`` is the blob's length and ``first`` its first bytes, both fetched when the reader is opened. A stored
    version never changes, so the pieces of one blob always fit together; if the version is deleted or pruned
    between two reads, ``read`` raises PrefixNotFound (or, for stores that keep an open file, goes on reading it).
    """

    size: int
    first: bytes

    @abstractmethod
    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``[start, end)`` range, in one round trip where the store allows it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the reader holds (an open file)."""


class WholeBlobReader(BlobReader):
    """A reader over a blob already in memory: the fallback for stores that can only read whole blobs."""

    def __init__(self, blob: bytes, first_bytes: int) -> None:
        self._blob = blob
        self.size = len(blob)
        self.first = blob[:first_bytes]

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        view = memoryview(self._blob)
        return [bytes(view[start:end]) for start, end in ranges]


class PrefixBackend(ABC):
    @abstractmethod
    def put(self, tenant: str, task_id: str, encode: Callable[[int], bytes]) -> int:
        """Store a new version and return its number.

        The backend picks a v greater than every existing version (the disk backend
        takes max + 1, starting at 1; Redis never reuses a number, even after a delete), calls
        `encode(v)` for the blob and stores it atomically. Concurrent puts never
        lose or overwrite a version: on conflict it retries with the next number
        (calling `encode` again).
        """

    @abstractmethod
    def get(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        """The blob of `version` (latest when None); PrefixNotFound if absent."""

    def get_header(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        """At least the blob's safetensors header (for metadata without the tensors); PrefixNotFound if absent.

        By default the whole blob; backends that can read less should.
        """
        return self.get(tenant, task_id, version)

    def latest_headers(self, tenant: str, task_ids: Sequence[str]) -> dict[str, bytes]:
        """``get_header`` of each task's latest version, by task id; tasks with no version are left out.

        By default one ``get_header`` per task; backends that can batch the reads (listing a tenant's 10,000
        prefixes) should.
        """
        out: dict[str, bytes] = {}
        for task_id in task_ids:
            try:
                out[task_id] = self.get_header(tenant, task_id)
            except PrefixNotFound:
                continue
        return out

    def open_blob(self, tenant: str, task_id: str, version: int, first_bytes: int) -> BlobReader:
        """A reader of one version's blob, with its size and first ``first_bytes`` bytes (fewer if it is shorter)
        already read; PrefixNotFound if absent.

        By default the whole blob is read at once; backends that can read ranges should.
        """
        return WholeBlobReader(self.get(tenant, task_id, version), first_bytes)

    @abstractmethod
    def latest_version(self, tenant: str, task_id: str) -> int | None:
        """The newest stored version, or None if the task has none."""

    @abstractmethod
    def list_tasks(self, tenant: str) -> list[str]:
        """Task ids of the tenant that have at least one version, sorted."""

    @abstractmethod
    def delete(self, tenant: str, task_id: str) -> bool:
        """Delete every version; False if the task did not exist."""

    def subscribe(self, callback: Callable[[Invalidation], None]) -> None:  # noqa: B027 - optional hook
        """Call `callback` (from any thread) when another process changes a task.

        Backends without change notification do nothing; the registry then relies
        on checking the latest version on use.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections or handles."""

    def tenant_lock(self, tenant: str) -> AbstractContextManager[None]:
        """Held around a tenant's storage-quota check and write, by every process sharing this store, so that two
        replicas cannot both find room for one more prefix. StoreUnavailable if it cannot be had within seconds.
        Stores no other process shares need no lock."""
        return nullcontext()

    def fault_domain(self, tenant: str, task_id: str | None = None) -> str | None:
        """The part of the store whose failure the task (without one: the tenant's listing) shares: the registry
        fails cold loads fast for a second after a failure, but only those in the failed domain. "" is the whole
        store, for stores that are one server; a cluster names the node that holds the task's slot, and None
        (a listing there reads every node) blames no part."""
        return ""

    def check(self) -> None:  # noqa: B027 - optional hook: a store opened without error is usable
        """Try the store once (at startup): ValueError if it is misconfigured for good (a wrong password, a
        database that does not exist), StoreUnavailable if it cannot be reached now (it may come up later)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the startup banner, e.g. "disk store at /var/lib/prefixes"."""
