"""Exceptions raised by the prefix store.

They carry no HTTP knowledge; the server maps each class to one status code
(noted per class) in a single handler.
"""

from __future__ import annotations


class PrefixStoreError(Exception):
    """Base class of every error the prefix store raises on purpose."""


class InvalidPrefix(PrefixStoreError):
    """Bad format, shape, dtype, non-finite values or a model mismatch (422)."""


class InvalidTaskId(PrefixStoreError):
    """A task id or tenant name that does not match the allowed pattern (422). ``field``: which of the two
    ("task_id" or "tenant"), the request field an error names."""

    def __init__(self, message: str, field: str = "task_id") -> None:
        super().__init__(message)
        self.field = field


class PrefixTooLarge(PrefixStoreError):
    """The prefix exceeds the upload size limit (413)."""


class PrefixNotFound(PrefixStoreError):
    """No such task (or version) for this tenant (404)."""


class CorruptPrefix(PrefixStoreError):
    """A stored blob failed its checksum or cannot be decoded; never served (503)."""


class StoreUnavailable(PrefixStoreError):
    """The backend cannot be reached or an I/O operation failed (503).

    ``answered``: the store replied at once with an error (a cluster failing over says CLUSTERDOWN, a restarted
    Redis says LOADING, a permission was taken away) rather than failing to answer: there is no timeout for later
    requests to wait out, so the registry asks it again at the next request instead of holding its circuit open.
    """

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered
