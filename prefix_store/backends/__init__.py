"""Prefix backends and the store URL parser."""

from __future__ import annotations

import os
from pathlib import Path

from prefix_store.backends.base import Invalidation, PrefixBackend
from prefix_store.backends.disk import DiskBackend
from prefix_store.backends.redis import RedisBackend
from prefix_store.backends.redis_url import CLUSTER_SCHEMES, host_and_port, is_loopback, redact_url

__all__ = [
    "DiskBackend",
    "Invalidation",
    "PrefixBackend",
    "RedisBackend",
    "default_store_url",
    "open_backend",
    "store_on_this_machine",
]


def default_store_url() -> str:
    """disk:// under the user's data dir ($XDG_DATA_HOME or ~/.local/share)/prefix-serve/prefixes."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return "disk://" + str(Path(base) / "prefix-serve" / "prefixes")


def store_on_this_machine(url: str) -> bool:
    """Whether the store at ``url`` is served by this machine (a disk path; Redis at loopback addresses): reading
    from it then costs this machine's CPU, not a wait on a network."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() == "disk":
        return True
    hosts = rest.partition("/")[0].rpartition("@")[2].split(",")  # userinfo@host:port[,host:port...]/db
    try:
        names = [host_and_port(host)[0] for host in hosts if host]
    except ValueError:
        return False
    return bool(names) and all(is_loopback(name) for name in names)


def open_backend(url: str) -> PrefixBackend:
    """Open the prefix store at `url`.

    `disk://PATH` or a bare path: DiskBackend. `redis://[user:password@]host:port/db`
    or `rediss://` (TLS): RedisBackend, which connects lazily, so an unreachable
    Redis shows up as StoreUnavailable on use rather than at startup;
    `redis+cluster://host:port` or `rediss+cluster://`: the same on a Redis Cluster.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return DiskBackend(Path(url))
    scheme = scheme.lower()
    if scheme == "disk":
        if not rest:
            raise ValueError(f"store URL {url!r} has no path (use disk:///abs/path or disk://rel/path)")
        return DiskBackend(Path(rest))
    if scheme in ("redis", "rediss", *CLUSTER_SCHEMES):
        return RedisBackend(url)
    raise ValueError(
        f"unknown store URL scheme {scheme!r} in {redact_url(url)!r}"
        " (use disk://PATH, redis://HOST:PORT/DB or redis+cluster://HOST:PORT)"
    )
