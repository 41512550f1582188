"""API keys and tenants: ``Authorization: Bearer KEY`` -> who is calling."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from prefix_store.ids import validate_tenant
from server.errors import Unauthorized

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False


@dataclass(frozen=True)
class _Key:
    sha256: bytes
    principal: Principal


class KeyRing:
    """Keys from the --api-keys file; without one, every caller is the single tenant "default"."""

    def __init__(self, keys: list[_Key] | None) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    @classmethod
    def disabled(cls) -> KeyRing:
        return cls(None)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """A JSON list of {"tenant", "key" | "key_sha256", "admin"}; ValueError says what is wrong."""
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read API key file {path}: {exc}") from exc
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"API key file {path} must hold a non-empty JSON list")
        keys = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str):
                raise ValueError(f"API key entry {i} needs a string 'tenant'")
            tenant = validate_tenant(entry["tenant"])
            if isinstance(entry.get("key"), str) and entry["key"]:
                digest = hashlib.sha256(entry["key"].encode()).digest()
            elif isinstance(entry.get("key_sha256"), str):
                try:
                    digest = bytes.fromhex(entry["key_sha256"])
                except ValueError as exc:
                    raise ValueError(f"API key entry {i}: key_sha256 is not hex") from exc
                if len(digest) != 32:
                    raise ValueError(f"API key entry {i}: key_sha256 must be 64 hex digits")
            else:
                raise ValueError(f"API key entry {i} needs 'key' or 'key_sha256'")
            keys.append(_Key(digest, Principal(tenant, bool(entry.get("admin", False)))))
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if self._keys is None:
            return Principal(DEFAULT_TENANT, admin=True)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: Principal | None = None
        for key in self._keys:  # compare against every key, in constant time each
            if hmac.compare_digest(key.sha256, digest):
                found = key.principal
        if found is None:
            raise Unauthorized("invalid API key")
        return found
