"""The small interface every prefix backend implements.

Blobs are encoded artifacts (see prefix_store.artifact); backends store bytes
and version numbers and never look inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable


class PrefixBackend(ABC):
    @abstractmethod
    def put(self, tenant: str, task_id: str, encode: Callable[[int], bytes]) -> int:
        """Store a new version and return its number.

        The backend picks v = (max existing version) + 1, starting at 1, calls
        `encode(v)` for the blob and stores it atomically. Concurrent puts never
        lose or overwrite a version: on conflict it retries with the next number
        (calling `encode` again).
        """

    @abstractmethod
    def get(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        """The blob of `version` (latest when None); PrefixNotFound if absent."""

    @abstractmethod
    def latest_version(self, tenant: str, task_id: str) -> int | None:
        """The newest stored version, or None if the task has none."""

    @abstractmethod
    def list_tasks(self, tenant: str) -> list[str]:
        """Task ids of the tenant that have at least one version, sorted."""

    @abstractmethod
    def delete(self, tenant: str, task_id: str) -> bool:
        """Delete every version; False if the task did not exist."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections or handles."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the startup banner, e.g. "disk store at /var/lib/prefixes"."""
