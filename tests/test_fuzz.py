"""Schemathesis against the server's own OpenAPI schema, in process (ASGI), on a tiny model.

Every operation is fuzzed with valid and invalid inputs, with no key, a tenant
key and an admin key. Each response must be no 5xx and must match the schema:
its status code, content type, headers and body are the ones documented.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from server.api.app import create_app
from server.config import ServeConfig
from server.model_loading import load_model
from tests.test_http_api import native_blob

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
TENANT_KEY = "fuzz-tenant-key"
ADMIN_KEY = "fuzz-admin-key"
AUTHS: dict[str, dict[str, str]] = {
    "no key": {},
    "tenant key": {"authorization": f"Bearer {TENANT_KEY}"},
    "admin key": {"authorization": f"Bearer {ADMIN_KEY}"},
}
EXAMPLES_PER_RUN = 25  # per operation, auth and generation mode: 10 operations x 3 x 2 x 25 = 1,500 at most


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(
        json.dumps(
            [{"tenant": "fuzzer", "key": TENANT_KEY}, {"tenant": "ops", "key": ADMIN_KEY, "admin": True}],
        )
    )
    config = ServeConfig(
        store=f"disk://{tmp_path_factory.mktemp('store')}",
        api_keys=str(keys),
        max_new_tokens=4,  # bounds the cost of a generation the fuzzer gets through
        max_prompt_tokens=64,
        max_upload_bytes=64 * 1024,
        max_request_bytes=64 * 1024,
        max_batch_size=8,
        max_queue=16,
    )
    app = create_app(config, model=load_model(str(tiny_model_dir)))
    with TestClient(app) as client:  # runs the lifespan: the engine and store stay up for every call below
        for key in (TENANT_KEY, ADMIN_KEY):  # a stored task, so that some generated ids hit one
            r = client.put(
                "/v1/prefixes/a",
                content=native_blob(p=3),
                headers={"authorization": f"Bearer {key}", "content-type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text
        yield app


def _fuzz(operation, headers: dict[str, str], mode: GenerationMode, statuses: Counter[int], failures: list[str]) -> int:
    """Run one operation's cases with these headers; returns how many were sent."""
    strategy = operation.as_strategy(generation_mode=mode)
    sent = 0

    @settings(
        max_examples=EXAMPLES_PER_RUN,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(data=st.data())
    def run(data: st.DataObject) -> None:
        nonlocal sent
        case = data.draw(strategy)
        response = case.call(headers=headers)
        sent += 1
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as exc:  # collect every failing operation, not just the first
            failures.append(f"{operation.label} [{mode.value}, {headers}]: {exc}"[:2000])

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (an operation without inputs)
        assert mode == GenerationMode.NEGATIVE
    return sent


def test_fuzz_every_operation(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for operation in operations:
        for auth_name, headers in AUTHS.items():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                cases[f"{operation.label} [{auth_name}]"] += _fuzz(operation, headers, mode, statuses, failures)

    total = sum(cases.values())
    print(f"\nfuzz: {total} cases over {len(operations)} operations; statuses {dict(sorted(statuses.items()))}")
    for label, n in sorted(cases.items()):
        print(f"  {n:4d}  {label}")
    assert not failures, "\n\n".join(failures[:10])
    assert total >= 1000
    assert not any(code >= 500 for code in statuses)
