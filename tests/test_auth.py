"""API keys and tenant isolation through the real app: 401 shapes, 404 for another tenant's task on every route,
admin keys acting for a tenant, and keys never leaving the server (logs, error bodies)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.auth import TENANT_HEADER, KeyRing
from server.config import ServeConfig
from server.model_loading import load_model
from tests.test_http_api import assert_error, native_blob

ALICE_KEY = "alice-key-0123456789-plaintext"
BOB_KEY = "bob-key-9876543210-hashed"
ADMIN_KEY = "admin-key-ffff-eeee-dddd"
ALL_KEYS = (ALICE_KEY, BOB_KEY, ADMIN_KEY)


def auth(key: str, tenant: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    if tenant is not None:
        headers[TENANT_HEADER] = tenant
    return headers


ALICE, BOB, ADMIN = auth(ALICE_KEY), auth(BOB_KEY), auth(ADMIN_KEY)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    entries = [
        {"tenant": "alice", "key": ALICE_KEY},
        {"tenant": "bob", "key_sha256": hashlib.sha256(BOB_KEY.encode()).hexdigest()},
        {"tenant": "ops", "key": ADMIN_KEY, "admin": True},
    ]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    config = ServeConfig(store=f"disk://{store}", api_keys=str(key_file), max_new_tokens=8)
    with TestClient(create_app(config, model=load_model(str(tiny_model_dir)))) as c:
        yield c


def put(client: TestClient, task_id: str, headers: dict[str, str], p: int = 4):
    return client.put(
        f"/v1/prefixes/{task_id}",
        content=native_blob(p=p),
        headers={**headers, "content-type": "application/octet-stream"},
    )


def gen(client: TestClient, task_id: str | None, headers: dict[str, str]):
    return client.post("/v1/generate", json={"task_id": task_id, "prompt": "hi", "max_new_tokens": 2}, headers=headers)


def openai_calls(client: TestClient, model: str, headers: dict[str, str]) -> list:
    return [
        client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, headers=headers),
        client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers=headers,
        ),
        client.get(f"/v1/models/{model}", headers=headers),
    ]


# ----- 401 -------------------------------------------------------------------------------------

NATIVE_ROUTES = [
    ("GET", "/v1/prefixes"),
    ("GET", "/v1/prefixes/x"),
    ("PUT", "/v1/prefixes/x"),
    ("DELETE", "/v1/prefixes/x"),
    ("POST", "/v1/generate"),
]
OPENAI_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/x"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
]
BAD_AUTH = [
    {},
    {"authorization": ""},
    {"authorization": "Bearer"},
    {"authorization": "Bearer    "},
    {"authorization": f"Basic {ALICE_KEY}"},
    {"authorization": ALICE_KEY},
    {"authorization": "Bearer wrong-key"},
    {"authorization": f"Bearer {ALICE_KEY}x"},
    {"authorization": f"Bearer {hashlib.sha256(BOB_KEY.encode()).hexdigest()}"},  # the digest is not the key
]


@pytest.mark.parametrize("headers", BAD_AUTH)
def test_every_api_route_needs_a_valid_key(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in NATIVE_ROUTES:
        r = client.request(method, path, headers=headers, json={"prompt": "hi"})
        assert_error(r, 401)
        assert r.json()["error"]["type"] == "unauthorized"
    for method, path in OPENAI_ROUTES:
        r = client.request(method, path, headers=headers, json={"model": "x", "prompt": "hi"})
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key" and error["message"], (
            error
        )
    assert client.get("/health", headers=headers).status_code == 200
    assert client.get("/metrics", headers=headers).status_code == 200


def test_plaintext_and_sha256_keys_both_authenticate(client: TestClient) -> None:
    assert client.get("/v1/prefixes", headers=ALICE).status_code == 200
    assert client.get("/v1/prefixes", headers=BOB).status_code == 200
    assert client.get("/v1/prefixes", headers={"authorization": f"bearer {BOB_KEY}"}).status_code == 200


# ----- isolation -------------------------------------------------------------------------------


def test_another_tenants_task_is_not_found_everywhere(client: TestClient) -> None:
    alice_secret = put(client, "alice-only", ALICE, p=3).json()
    alice_shared = put(client, "shared-name", ALICE, p=3).json()
    bob_shared = put(client, "shared-name", BOB, p=5)
    assert bob_shared.status_code == 201, bob_shared.text
    assert bob_shared.json()["num_virtual_tokens"] == 5  # bob's own task of the same name

    # Bob gets exactly what he gets for a task that never existed: nothing tells him alice-only exists.
    for task, never in (("alice-only", "never-was"),):
        got = [client.get(f"/v1/prefixes/{task}", headers=BOB), gen(client, task, BOB)]
        got += [client.delete(f"/v1/prefixes/{task}", headers=BOB), *openai_calls(client, task, BOB)]
        want = [client.get(f"/v1/prefixes/{never}", headers=BOB), gen(client, never, BOB)]
        want += [client.delete(f"/v1/prefixes/{never}", headers=BOB), *openai_calls(client, never, BOB)]
        for a, b in zip(got, want, strict=True):
            assert a.status_code == 404, a.text
            assert a.text.replace(task, never) == b.text

    # Listings show only the caller's own tasks.
    assert [p["task_id"] for p in client.get("/v1/prefixes", headers=BOB).json()["data"]] == ["shared-name"]
    alice_list = {p["task_id"]: p for p in client.get("/v1/prefixes", headers=ALICE).json()["data"]}
    assert set(alice_list) == {"alice-only", "shared-name"}
    bob_models = [m["id"] for m in client.get("/v1/models", headers=BOB).json()["data"]]
    assert "alice-only" not in bob_models and "shared-name" in bob_models

    # Bob's upload and delete of "shared-name" touched only his own task.
    assert alice_list["shared-name"] == alice_shared and alice_list["alice-only"] == alice_secret
    assert client.delete("/v1/prefixes/shared-name", headers=BOB).status_code == 204
    assert client.get("/v1/prefixes/shared-name", headers=ALICE).json() == alice_shared
    r = gen(client, "shared-name", ALICE)
    assert r.status_code == 200 and r.json()["prefix_version"] == alice_shared["version"]
    assert_error(gen(client, "shared-name", BOB), 404)


def test_admin_acts_for_a_tenant(client: TestClient) -> None:
    put(client, "admin-visible", ALICE)
    as_alice = auth(ADMIN_KEY, "alice")
    # Without the header the admin key is its own tenant, "ops".
    assert_error(client.get("/v1/prefixes/admin-visible", headers=ADMIN), 404)
    assert "admin-visible" in [p["task_id"] for p in client.get("/v1/prefixes", headers=as_alice).json()["data"]]
    assert client.get("/v1/prefixes/admin-visible", headers=as_alice).status_code == 200
    assert gen(client, "admin-visible", as_alice).status_code == 200
    assert all(r.status_code == 200 for r in openai_calls(client, "admin-visible", as_alice))
    r = put(client, "made-by-admin", as_alice)
    assert r.status_code == 201
    assert client.get("/v1/prefixes/made-by-admin", headers=ALICE).json() == r.json()
    assert client.delete("/v1/prefixes/made-by-admin", headers=as_alice).status_code == 204
    assert_error(client.get("/v1/prefixes/made-by-admin", headers=ALICE), 404)
    assert_error(client.get("/v1/prefixes", headers=auth(ADMIN_KEY, "../alice")), 422, TENANT_HEADER)


def test_tenant_keys_cannot_act_for_others(client: TestClient) -> None:
    put(client, "bob-private", BOB)
    r = client.get("/v1/prefixes", headers=auth(ALICE_KEY, "bob"))
    assert_error(r, 403, TENANT_HEADER)
    assert "bob-private" not in r.text
    assert_error(gen(client, "bob-private", auth(ALICE_KEY, "bob")), 403)
    r = client.post("/v1/completions", json={"model": "bob-private", "prompt": "x"}, headers=auth(ALICE_KEY, "bob"))
    assert r.status_code == 403 and r.json()["error"]["message"]
    # Naming one's own tenant is allowed.
    assert client.get("/v1/prefixes", headers=auth(ALICE_KEY, "alice")).status_code == 200


# ----- secrets stay secret ---------------------------------------------------------------------


def test_keys_never_logged_nor_echoed(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    for key in (*ALL_KEYS, ALICE_KEY + "-wrong", "x" + BOB_KEY):
        for headers in (auth(key), auth(key, "bob"), auth(key, "../../etc")):
            for method, path in NATIVE_ROUTES + OPENAI_ROUTES:
                body = {"prompt": "hi", "model": "m", "max_new_tokens": 1, "max_tokens": 1}
                bodies.append(client.request(method, path, headers=headers, json=body).text)
            bodies.append(client.post("/v1/generate", headers=headers, content=b"{broken").text)
    text = "\n".join(bodies) + caplog.text
    for key in (*ALL_KEYS, hashlib.sha256(BOB_KEY.encode()).hexdigest()):
        assert key not in text
        assert key[:12] not in text


def test_key_file_errors_never_echo_keys(tmp_path: Path) -> None:
    secret = "super-secret-key-value"
    cases = [
        [{"tenant": "../x", "key": secret}],
        [{"tenant": "a", "key": secret}, {"tenant": "b", "key": secret}],  # one key, two tenants
        [{"tenant": "a", "key_sha256": secret}],
        [{"tenant": "a", "key_sha256": "ab" * 16}],
        [{"tenant": "a"}],
        [{"tenant": "a", "key": secret, "admin": "yes"}],
        [{"tenant": "a", "key": secret, "quotas": {"max_prefixes": -1}}],
        [{"tenant": "a", "key": secret, "quotas": {"nonsense": 1}}],
        [{"tenant": "a", "key": secret, "quotas": {"max_prefixes": 1}}, {"tenant": "a", "key": "k2", "quotas": {}}],
        {"tenant": "a", "key": secret},
        [],
    ]
    for entries in cases:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(entries))
        with pytest.raises(ValueError) as info:
            KeyRing.load(path)
        assert secret not in str(info.value), info.value
    path.write_text("[{" + secret)  # not JSON: the parser's message quotes no content
    with pytest.raises(ValueError) as info:
        KeyRing.load(path)
    assert secret not in str(info.value)
