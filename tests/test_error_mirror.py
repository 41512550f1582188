"""The client's typed exceptions mirror every error type the server can send."""

from __future__ import annotations

import server.errors as server_errors
from clients import errors as client_errors


def _server_error_classes() -> list[type[server_errors.ApiError]]:
    return [
        cls
        for cls in vars(server_errors).values()
        if isinstance(cls, type) and issubclass(cls, server_errors.ApiError) and cls is not server_errors.ApiError
    ]


def test_every_server_error_type_has_a_client_exception() -> None:
    server_types = {cls.error_type for cls in _server_error_classes()}
    assert {"not_found", "overloaded", "quota_exceeded", "forbidden"} <= server_types
    missing = server_types - set(client_errors._BY_TYPE)
    assert not missing, f"client has no exception for server error types {sorted(missing)}"


def test_status_fallback_matches_the_server() -> None:
    for cls in _server_error_classes():
        if cls.status_code in client_errors._BY_STATUS:
            assert client_errors._BY_STATUS[cls.status_code].error_type in {
                c.error_type for c in _server_error_classes() if c.status_code == cls.status_code
            }, cls
