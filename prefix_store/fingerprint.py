"""Fingerprint of the base model a prefix was made for."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from prefix_store.errors import InvalidPrefix


@dataclass(frozen=True)
class ModelFingerprint:
    """What a prefix must agree with to be placed in a model's attention cache.

    The server builds it by probing the model's real cache shape; a prefix is
    [num_layers, 2, num_kv_heads, P, head_dim].
    """

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> ModelFingerprint:
        """Build from a dict (e.g. parsed JSON); InvalidPrefix if malformed."""
        if not isinstance(d, dict):
            raise InvalidPrefix(f"fingerprint must be a JSON object, got {type(d).__name__}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                raise InvalidPrefix(f"fingerprint is missing {f.name!r}")
            v = d[f.name]
            if f.name == "architecture":
                if not isinstance(v, str):
                    raise InvalidPrefix("fingerprint architecture must be a string")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidPrefix(f"fingerprint {f.name} must be a non-negative integer, got {v!r}")
            values[f.name] = v
        return cls(**values)

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Human-readable lines, `self` being the prefix's and `other` the model's."""
        out: list[str] = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: prefix has {mine}, model has {theirs}")
        return out
