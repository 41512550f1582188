"""The small interface every prefix backend implements.

Blobs are encoded artifacts (see prefix_store.artifact); backends store bytes
and version numbers and never look inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Invalidation:
    """A change to the store by any replica: a new `version` of a task, or its deletion (version None).

    tenant and task_id None means "messages may have been missed" (the
    subscription was re-established): drop anything derived from the store.
    """

    tenant: str | None
    task_id: str | None
    version: int | None


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

    @abstractmethod
    def describe(self) -> str:
        """One line for the startup banner, e.g. "disk store at /var/lib/prefixes"."""
