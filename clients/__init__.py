"""Talking to a prefix-serve server over HTTP: ``Client``, ``AsyncClient``, typed errors, the CLI commands."""

from clients.client import AsyncClient, Client
from clients.errors import PrefixServeError

__all__ = ["AsyncClient", "Client", "PrefixServeError"]
