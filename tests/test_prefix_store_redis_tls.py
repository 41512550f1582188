"""The Redis store over TLS (rediss://, rediss+cluster://), against real redis-server processes that speak only
TLS, with certificates from a test CA: replicas sharing prefixes, client certificates, and the mistakes a TLS
setup invites refused at startup with what to change."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
import redis
import torch

from prefix_store.backends import Invalidation, RedisBackend, open_backend
from prefix_store.errors import PrefixNotFound, StoreUnavailable
from prefix_store.registry import PrefixRegistry
from server.cli import _store_problem
from tests.redis_server import RedisClusterServers, RedisServer, TlsFiles
from tests.test_prefix_store_redis import PASSWORD, eventually, make_kv, open_registry  # noqa: F401

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def _share_prefixes(url: str, open_one: Callable[..., PrefixRegistry], tasks: list[str]) -> None:
    """Two registries on `url` (two replicas): uploads, re-uploads and deletes on one are seen by the other, whose
    loads come in 1 KiB pieces (ranged reads)."""
    writer, reader = open_one(url), open_one(url, load_piece_bytes=1024)
    assert reader.backend.wait_subscribed(5.0)  # type: ignore[attr-defined]
    kvs = {task: make_kv(p=16, seed=i) for i, task in enumerate(tasks)}
    for task, kv in kvs.items():
        assert writer.upload("acme", task, kv).version == 1
    for task, kv in kvs.items():
        assert torch.equal(reader.resolve("acme", task).key_values, kv)
    assert sorted(m.task_id for m in reader.list("acme")) == sorted(tasks)
    # A new version reaches the reader, and so does the notice of it on the invalidation channel (over TLS too).
    heard: list[Invalidation] = []
    reader.backend.subscribe(heard.append)
    writer.upload("acme", tasks[0], make_kv(p=16, seed=99))
    eventually(lambda: any((e.task_id, e.version) == (tasks[0], 2) for e in heard), 1.0)
    eventually(lambda: torch.equal(reader.resolve("acme", tasks[0]).key_values, make_kv(p=16, seed=99)), 1.0)
    writer.delete("acme", tasks[1])

    def deleted() -> bool:
        try:
            reader.resolve("acme", tasks[1])
        except PrefixNotFound:
            return True
        return False

    eventually(deleted, 1.0)


def test_replicas_share_prefixes_over_tls(
    make_redis_server: Callable[..., RedisServer],
    tls_files: TlsFiles,
    open_registry: Callable[..., PrefixRegistry],  # noqa: F811
) -> None:
    server = make_redis_server(tls=tls_files, password=PASSWORD)
    assert server.url.startswith("rediss://") and _store_problem(server.url) is None
    _share_prefixes(server.url, open_registry, [f"task{i}" for i in range(4)])


def test_a_cluster_over_tls(
    make_redis_cluster: Callable[..., RedisClusterServers],
    tls_files: TlsFiles,
    open_registry: Callable[..., PrefixRegistry],  # noqa: F811
) -> None:
    cluster = make_redis_cluster(tls=tls_files)  # the nodes' bus is TLS as well (tls-cluster yes)
    assert cluster.url.startswith("rediss+cluster://") and _store_problem(cluster.url) is None
    tasks = [f"task{i}" for i in range(8)]
    assert len({cluster.node_of(f"ps:{{acme/{t}}}:latest").port for t in tasks}) == 3  # on every node
    _share_prefixes(cluster.url, open_registry, tasks)
    # The nodes the client found by itself are reached with the seed's TLS options.
    backend = open_backend(cluster.url)
    assert isinstance(backend, RedisBackend) and isinstance(backend.client, redis.RedisCluster)
    assert {node.port for node in backend.client.get_primaries()} == {node.port for node in cluster.nodes}
    backend.close()


def test_client_certificates(make_redis_server: Callable[..., RedisServer], tls_files: TlsFiles) -> None:
    """A server that requires a client certificate: without one the handshake fails, and the error says that a
    certificate may be what is missing; with one named in the URL the store works."""
    server = make_redis_server(tls=tls_files, tls_auth_clients=True)
    without = RedisBackend(server.url)
    with pytest.raises(StoreUnavailable, match=r"TLS handshake failed.*ssl_certfile=PATH&ssl_keyfile=PATH"):
        without.check()
    without.close()
    with_cert = RedisBackend(f"{server.url}&ssl_certfile={tls_files.client_cert}&ssl_keyfile={tls_files.client_key}")
    with_cert.check()
    assert with_cert.put("acme", "sum", lambda v: b"x") == 1
    with_cert.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["one-redis", "cluster"])
def test_a_certificate_we_cannot_trust_is_refused_at_startup(
    make_redis_server: Callable[..., RedisServer],
    make_redis_cluster: Callable[..., RedisClusterServers],
    tls_files: TlsFiles,
    tmp_path_factory: pytest.TempPathFactory,
    cluster: bool,
) -> None:
    """No retry fixes a certificate that fails verification, so the server does not start on it (as for a wrong
    password); the message says which option names the CA."""
    url = make_redis_cluster(nodes=1, tls=tls_files).url if cluster else make_redis_server(tls=tls_files).url
    assert _store_problem(url) is None
    no_ca = url.partition("?")[0]  # the system's CAs only
    another_ca = TlsFiles.make(tmp_path_factory.mktemp("another-ca")).ca
    for wrong in (no_ca, url.replace(str(tls_files.ca), str(another_ca))):
        problem = _store_problem(wrong)
        assert problem is not None
        assert "TLS certificate failed verification" in problem and "?ssl_ca_certs=PATH" in problem


def test_a_scheme_that_does_not_match_the_server_says_so(
    make_redis_server: Callable[..., RedisServer], tls_files: TlsFiles
) -> None:
    """A plain URL to a TLS port, and a TLS URL to a plain port: unreachable (the server may come up right), with
    the likely cause. A refused connection gets no such hint."""
    tls_server, plain_server = make_redis_server(tls=tls_files), make_redis_server()
    cases = {
        f"redis://127.0.0.1:{tls_server.port}/0": "speaks only TLS",
        f"rediss://127.0.0.1:{plain_server.port}/0?ssl_ca_certs={tls_files.ca}": "TLS handshake failed",
    }
    for url, hint in cases.items():
        backend = RedisBackend(url)
        with pytest.raises(StoreUnavailable, match=hint):
            backend.check()
        backend.close()
    plain_server.kill()
    backend = RedisBackend(f"rediss://127.0.0.1:{plain_server.port}/0?ssl_ca_certs={tls_files.ca}")
    with pytest.raises(StoreUnavailable) as refused:
        backend.check()
    assert "Connection refused" in str(refused.value) and "TLS handshake" not in str(refused.value)
    backend.close()


@pytest.mark.parametrize("scheme", ["redis", "rediss", "redis+cluster", "rediss+cluster"])
def test_options_redis_would_fail_on_later_are_refused_when_the_store_opens(scheme: str, tls_files: TlsFiles) -> None:
    """redis-py hands a URL's query options to each connection, made on the first command: a misspelt one was a
    TypeError on every request (a 500), a missing CA file a 503 for ever."""
    tls = scheme.startswith("rediss")
    base = f"{scheme}://127.0.0.1:1/0"
    refused = {
        f"{base}?socket_timout=2": "unknown option 'socket_timout'",
        f"{base}?socket_timeout=soon": "socket_timeout",
    }
    if tls:
        refused[f"{base}?ssl_ca_certs=/no/such/ca.pem"] = "ssl_ca_certs=/no/such/ca.pem: no such file or directory"
        refused[f"{base}?ssl_cert_reqs=maybe"] = "maybe"
    else:
        refused[f"{base}?ssl_ca_certs={tls_files.ca}"] = "ssl_ca_certs is a TLS option: the URL's scheme must be rediss"
    for url, reason in refused.items():
        with pytest.raises(ValueError, match="bad redis store URL") as error:
            open_backend(url)
        assert reason in str(error.value), url
    accepted = f"{base}?socket_timeout=2&health_check_interval=10" + (
        f"&ssl_ca_certs={tls_files.ca}&ssl_cert_reqs=required" if tls else ""
    )
    open_backend(accepted).close()
