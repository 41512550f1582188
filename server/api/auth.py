"""API keys and tenants: ``Authorization: Bearer KEY`` -> who is calling.

Keys are kept only as sha256 digests and compared in constant time; neither a
key nor its digest ever appears in a log line or an error body. An admin key
may act for another tenant by naming it in the ``X-Prefix-Serve-Tenant``
header; for any other key that header must be absent or name its own tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from prefix_store.errors import InvalidTaskId
from prefix_store.ids import validate_tenant
from server.errors import Forbidden, InvalidInput, Unauthorized
from server.quotas import TenantQuotas

DEFAULT_TENANT = "default"
TENANT_HEADER = "X-Prefix-Serve-Tenant"
# How the placeholder keys of the templates begin (docker/api_keys.example.json, docker/k8s/secret.example.yaml).
PLACEHOLDER_KEY_PREFIXES = ("replace-me", "CHANGE_ME")


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

    def __init__(self, keys: list[_Key] | None, quotas: dict[str, dict[str, int | None]] | None = None) -> None:
        self._keys = keys
        self._quotas = quotas or {}  # tenant -> its quota overrides from the key file

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    @classmethod
    def disabled(cls) -> KeyRing:
        return cls(None)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """A JSON list of {"tenant", "key" | "key_sha256", "admin", "quotas"}; ValueError says what is wrong.

        "quotas" (optional) overrides the server's per-tenant defaults, e.g.
        {"max_concurrent_requests": 4, "max_prefixes": 100}; null = unlimited.
        Entries of one tenant must not disagree on them.
        """
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read API key file {path}: {exc}") from exc
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"API key file {path} must hold a non-empty JSON list")
        keys: list[_Key] = []
        quotas: dict[str, dict[str, int | None]] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str):
                raise ValueError(f"API key entry {i} needs a string 'tenant'")
            try:
                tenant = validate_tenant(entry["tenant"])
            except InvalidTaskId as exc:
                raise ValueError(f"API key entry {i}: {exc}") from exc
            if isinstance(entry.get("key"), str) and entry["key"].startswith(PLACEHOLDER_KEY_PREFIXES):
                # The templates' placeholders are public: a server must never take them for keys.
                raise ValueError(f"API key entry {i} is still the template's placeholder: put a real key in {path}")
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
            if any(hmac.compare_digest(k.sha256, digest) for k in keys):
                raise ValueError(f"API key entry {i} repeats the key of an earlier entry")
            if not isinstance(entry.get("admin", False), bool):
                raise ValueError(f"API key entry {i}: 'admin' must be true or false")
            if "quotas" in entry:
                overrides = TenantQuotas.parse_overrides(entry["quotas"], f"API key entry {i}")
                if quotas.setdefault(tenant, overrides) != overrides:
                    raise ValueError(f"API key entry {i}: quotas differ from another entry of tenant {tenant!r}")
            keys.append(_Key(digest, Principal(tenant, bool(entry.get("admin", False)))))
        return cls(keys, quotas)

    def quota_overrides(self, tenant: str) -> dict[str, int | None]:
        return self._quotas.get(tenant, {})

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


def acting_for(principal: Principal, tenant: str | None) -> Principal:
    """The principal a request acts as, given the X-Prefix-Serve-Tenant header (None when absent)."""
    if tenant is None or tenant == principal.tenant:
        return principal
    if not principal.admin:
        raise Forbidden(f"only admin keys may act for another tenant ({TENANT_HEADER})")
    try:
        validate_tenant(tenant)
    except InvalidTaskId as exc:
        raise InvalidInput(f"{TENANT_HEADER}: {exc}") from exc
    return Principal(tenant, admin=True)
