"""The Redis backend on a real Redis Cluster (three redis-server primaries on loopback, the slots split between
them): each task's keys in one slot, tasks spread over the nodes, scripts, pipelines and pub/sub across them, a
node down and back."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from prefix_store.backends import Invalidation, RedisBackend, open_backend
from prefix_store.errors import CorruptPrefix, PrefixNotFound, StoreUnavailable
from prefix_store.registry import PrefixRegistry
from server.api.response_store import RedisResponseStore, StoredResponse
from server.cli import _store_problem
from tests.redis_server import RedisClusterServers, RedisServer, free_cluster_port
from tests.test_prefix_store_redis import FP, eventually
from tests.test_prefix_store_redis import make_kv as make_kv_of

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

TASKS = [f"task{i}" for i in range(8)]


def make_kv(seed: int = 0) -> torch.Tensor:
    return make_kv_of(p=16, seed=seed)  # [L, 2, H, P, d]: 4 KiB, so 1 KiB pieces make four reads


def absent(registry: PrefixRegistry, task_id: str) -> bool:
    return absent_for(registry, "acme", task_id)


def absent_for(registry: PrefixRegistry, tenant: str, task_id: str) -> bool:
    try:
        registry.resolve(tenant, task_id)
    except PrefixNotFound:
        return True
    return False


@pytest.fixture
def cluster(make_redis_cluster: Callable[..., RedisClusterServers]) -> RedisClusterServers:
    return make_redis_cluster()


@pytest.fixture
def open_registry() -> Iterator[Callable[..., PrefixRegistry]]:
    """Registries on their own backend each (as separate replicas would have), closed afterwards."""
    backends: list[RedisBackend] = []

    def make(url: str, **kwargs: object) -> PrefixRegistry:
        backend = open_backend(url)
        assert isinstance(backend, RedisBackend) and backend.cluster
        backends.append(backend)
        return PrefixRegistry(backend, FP, max_virtual_tokens=16, **kwargs)  # type: ignore[arg-type]

    yield make
    for backend in backends:
        backend.close()


def test_replicas_share_prefixes_spread_over_the_cluster(
    cluster: RedisClusterServers, open_registry: Callable[..., PrefixRegistry]
) -> None:
    a = open_registry(cluster.url)
    b = open_registry(f"redis+cluster://127.0.0.1:{cluster.nodes[2].port}", load_piece_bytes=1024)
    assert b.backend.wait_subscribed(5.0)  # type: ignore[attr-defined]
    uploaded = {task: make_kv(seed=i) for i, task in enumerate(TASKS)}
    for task, kv in uploaded.items():
        assert a.upload("acme", task, kv).version == 1
    # The tasks live on more than one node, and every key of a task in its one slot.
    slots: dict[str, set[int]] = {}
    for node in cluster.nodes:
        client = node.client()
        for key in client.scan_iter("ps:{acme/*"):
            tag = key.decode().split("}")[0] + "}"
            slots.setdefault(tag, set()).add(int(client.execute_command("CLUSTER", "KEYSLOT", key)))
    assert len(slots) == len(TASKS) and all(len(s) == 1 for s in slots.values())
    assert len({cluster.node_of(f"ps:{{acme/{task}}}:latest").port for task in TASKS}) >= 2
    # Another replica reads each one in 1 KiB pieces (GETRANGE pipelines) from whichever node holds it.
    for task, kv in uploaded.items():
        assert torch.equal(b.resolve("acme", task).key_values, kv)
    assert sorted(m.task_id for m in b.list("acme")) == TASKS
    # A new version and a delete reach the other replica within a second (PUBLISH reaches every node).
    newer = make_kv_of(p=8, seed=99)
    assert a.upload("acme", "task3", newer).version == 2
    eventually(lambda: torch.equal(b.resolve("acme", "task3").key_values, newer), within=1.0)
    assert a.delete("acme", "task5")
    eventually(lambda: absent(b, "task5"), within=1.0)
    # Versions beyond the newest five are pruned, on the node that holds the task.
    for seed in range(6):
        a.upload("acme", "task0", make_kv(seed=100 + seed))
    with pytest.raises(PrefixNotFound):
        b.resolve("acme", "task0", version=1)
    assert torch.equal(b.resolve("acme", "task0", version=7).key_values, make_kv(seed=105))
    assert {m.task_id: m.version for m in b.list("acme")}["task0"] == 7


def test_listing_keeps_a_task_whose_version_was_pruned_between_its_two_reads(cluster: RedisClusterServers) -> None:
    """A cluster pipeline runs no scripts: listing reads pointers, then headers. A version pruned in between is
    read again, pointer and header together."""
    writer = RedisBackend(cluster.url, keep_versions=1)
    lister = RedisBackend(cluster.url)
    writer.put("acme", "busy", lambda v: b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + bytes([v]))
    pipelined = lister._pipelined
    calls: list[str] = []

    def pipelined_then_write(commands: list[tuple[object, ...]]) -> list[object]:
        result = pipelined(commands)
        calls.append(str(commands[0][0]))
        if len(calls) == 1:  # the pointers are read: a newer version replaces the one they name
            writer.put("acme", "busy", lambda v: b'\x07\x00\x00\x00\x00\x00\x00\x00{"a":2}' + bytes([v]))
        return result

    lister._pipelined = pipelined_then_write  # type: ignore[method-assign]
    headers = lister.latest_headers("acme", ["busy", "never"])
    assert calls == ["get", "hget"]
    assert headers == {"busy": b'\x07\x00\x00\x00\x00\x00\x00\x00{"a":2}'}
    writer.close()
    lister.close()


@pytest.mark.parametrize("offset", [-1, 20])  # a tensor byte; a header byte
def test_corrupt_blob_on_a_cluster_is_never_served(
    cluster: RedisClusterServers, open_registry: Callable[..., PrefixRegistry], offset: int
) -> None:
    open_registry(cluster.url).upload("acme", "sum", make_kv())
    client = cluster.node_of("ps:{acme/sum}:v:1").client()  # the node that holds it
    data = bytearray(client.get("ps:{acme/sum}:v:1"))  # type: ignore[arg-type]
    data[offset] ^= 0x5A
    client.set("ps:{acme/sum}:v:1", bytes(data))
    cold = open_registry(cluster.url, load_piece_bytes=1024)
    for _ in range(2):  # and not cached after the first failure
        with pytest.raises(CorruptPrefix):
            cold.resolve("acme", "sum")


def test_a_node_down_and_back(
    make_redis_cluster: Callable[..., RedisClusterServers], open_registry: Callable[..., PrefixRegistry]
) -> None:
    cluster = make_redis_cluster(persistent=True)  # AOF: a restarted node keeps what it held
    writer = open_registry(cluster.url)
    for i, task in enumerate(TASKS):
        writer.upload("acme", task, make_kv(seed=i))
    down = cluster.nodes[1]
    on_down = [t for t in TASKS if cluster.node_of(f"ps:{{acme/{t}}}:latest") is down]
    elsewhere = [t for t in TASKS if t not in on_down]
    assert on_down and len(elsewhere) >= 3
    other_tenant, other_task = next(
        (f"tenant{i}", f"t{i}")
        for i in range(1000)
        if cluster.node_of(f"ps:{{tenant{i}}}:tasks") is down
        and cluster.node_of(f"ps:{{tenant{i}/t{i}}}:v") is not down
    )
    writer.upload(other_tenant, other_task, make_kv(seed=60))
    serving = open_registry(cluster.url)
    resident = serving.resolve("acme", elsewhere[0]).key_values

    assert down.proc is not None
    down.proc.send_signal(signal.SIGSTOP)  # hung: a cold load there costs one socket timeout (1 s), not two
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        serving.resolve("acme", on_down[1] if len(on_down) > 1 else on_down[0])
    assert time.monotonic() - start < 1.6
    down.proc.send_signal(signal.SIGCONT)

    down.kill()
    # The resident prefix keeps being served; a cold one on the dead node fails fast.
    for _ in range(3):
        assert torch.equal(serving.resolve("acme", elsewhere[0]).key_values, resident)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        serving.resolve("acme", on_down[0])
    assert time.monotonic() - start < 2.0
    # Only that node's tasks fail: a cold one on a live node loads right after (its circuit is its node's), and
    # after a listing, which reads every node and fails, blaming none of them.
    assert torch.equal(serving.resolve("acme", elsewhere[1]).key_values, make_kv(seed=TASKS.index(elsewhere[1])))
    with pytest.raises(StoreUnavailable):
        serving.list("acme")
    assert torch.equal(serving.resolve("acme", elsewhere[2]).key_values, make_kv(seed=TASKS.index(elsewhere[2])))
    # A delete whose tenant index is on the dead node still deletes, and says so (the entry is left behind).
    assert writer.delete(other_tenant, other_task) is True
    assert absent_for(serving, other_tenant, other_task)
    # An upload to a task in the dead node's slots fails and writes nothing; one elsewhere is stored, also where
    # the node has no scripts cached (as after its own restart), which redis-py would load on every node.
    lost = next(f"new{i}" for i in range(100) if cluster.node_of(f"ps:{{acme/new{i}}}:latest") is down)
    with pytest.raises(StoreUnavailable):
        writer.upload("acme", lost, make_kv(seed=50))
    for node in cluster.nodes:
        if node is not down:
            node.client().script_flush()
    kept = next(f"new{i}" for i in range(100) if cluster.node_of(f"ps:{{acme/new{i}}}:latest") is not down)
    assert writer.upload("acme", kept, make_kv(seed=51)).version == 1

    down.start()  # same port and nodes.conf: it rejoins with its slots
    cluster.wait_ok()
    eventually(
        lambda: torch.equal(serving.resolve("acme", on_down[0]).key_values, make_kv(seed=TASKS.index(on_down[0]))),
        within=10.0,
    )
    assert absent(serving, lost)
    assert sorted(m.task_id for m in serving.list("acme")) == sorted([*TASKS, kept])


def test_responses_store_on_a_cluster(cluster: RedisClusterServers) -> None:
    backend = RedisBackend(cluster.url)
    store = RedisResponseStore(backend, ttl_s=60)
    tenants = [f"tenant{i}" for i in range(6)]
    assert len({cluster.node_of(f"ps:{{{t}}}:resps").port for t in tenants}) >= 2
    for i, tenant in enumerate(tenants):
        item = {"id": f"msg_{i}", "role": "user", "content": f"hello {i}"}
        store.put(tenant, f"resp_{i:024x}", StoredResponse([item], {"id": f"resp_{i:024x}"}))
    for i, tenant in enumerate(tenants):
        got = store.get(tenant, f"resp_{i:024x}")
        assert got is not None and got.items[0]["content"] == f"hello {i}"
        assert store.find_items(tenant, [f"msg_{i}", "msg_missing"]) == {f"msg_{i}": got.items[0]}
        assert store.get(tenants[i - 1], f"resp_{i:024x}") is None  # another tenant's
    assert store.delete(tenants[0], f"resp_{0:024x}") and store.get(tenants[0], f"resp_{0:024x}") is None
    backend.close()


def test_cluster_urls_checked_by_name(cluster: RedisClusterServers) -> None:
    node = cluster.nodes[0]
    plain = f"redis://127.0.0.1:{node.port}/0"
    problem = _store_problem(plain)
    assert problem is not None and "is a Redis Cluster node" in problem and "redis+cluster://" in problem
    assert _store_problem(cluster.url) is None
    for db in ("/2", "/0?db=1"):
        with pytest.raises(ValueError, match="only database 0"):
            open_backend(f"redis+cluster://127.0.0.1:{node.port}{db}")
    # Nothing listens there: the backend opens (the client is built on first use) and fails on use, fast.
    backend = open_backend(f"redis+cluster://127.0.0.1:{free_cluster_port()}")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        backend.check()
    with pytest.raises(StoreUnavailable):
        backend.latest_version("acme", "sum")
    assert time.monotonic() - start < 2.0
    backend.close()
    assert isinstance(RedisBackend(cluster.url).client, redis.RedisCluster)


def test_the_subscriber_moves_off_a_node_that_died(cluster: RedisClusterServers) -> None:
    """Invalidations keep arriving while the node the subscriber listened on is down."""
    listener, writer = RedisBackend(cluster.url), RedisBackend(cluster.url)
    events: list[Invalidation] = []
    listener.subscribe(events.append)
    assert listener.wait_subscribed(5.0)
    writer.put("acme", "before", lambda v: b"x")
    eventually(lambda: any(e.task_id == "before" for e in events), within=1.0)
    # The node the subscription is on: the one whose client list shows a connection subscribed to one channel.
    listening = [n for n in cluster.nodes if any(c.get("sub") == "1" for c in n.client().client_list())]
    assert len(listening) == 1
    listening[0].kill()
    # A write the live nodes take: its task's keys and its tenant's index both elsewhere.
    tenant, task = next(
        (f"tenant{i}", f"t{i}")
        for i in range(1000)
        if listening[0] not in (cluster.node_of(f"ps:{{tenant{i}}}:tasks"), cluster.node_of(f"ps:{{tenant{i}/t{i}}}:v"))
    )
    eventually(lambda: writer.put(tenant, task, lambda v: b"y") > 0 and any(e.task_id == task for e in events), 5.0)
    listener.close()
    writer.close()


def test_a_primary_fails_over_to_its_replica(
    make_redis_cluster: Callable[..., RedisClusterServers], open_registry: Callable[..., PrefixRegistry]
) -> None:
    """With a replica per primary, a primary that dies is replaced (its node timeout is 1 s here): cold loads and
    uploads of its tasks come back by themselves, from the same registries, with no restart."""
    cluster = make_redis_cluster(replicas=True)
    writer = open_registry(cluster.url)
    for i, task in enumerate(TASKS):
        writer.upload("acme", task, make_kv(seed=i))
    failed = cluster.nodes[1]
    on_failed = [t for t in TASKS if cluster.node_of(f"ps:{{acme/{t}}}:latest") is failed]
    assert on_failed
    assert failed.client().wait(1, 5000) == 1  # its replica has every write
    serving = open_registry(cluster.url)

    def loads(task: str, seed: int) -> bool:
        try:
            return torch.equal(serving.resolve("acme", task).key_values, make_kv(seed=seed))
        except StoreUnavailable:
            return False

    failed.kill()
    took = eventually(lambda: loads(on_failed[0], TASKS.index(on_failed[0])), within=20.0)
    # The other primaries say the cluster is ok again tens of milliseconds after the promoted replica does; a load
    # that meets a CLUSTERDOWN in between holds its node's circuit open for a second. So: all of them, soon after.
    all_back = took + eventually(lambda: all(loads(task, TASKS.index(task)) for task in TASKS), within=5.0)
    assert writer.upload("acme", on_failed[0], make_kv(seed=77)).version == 2
    eventually(lambda: loads(on_failed[0], 77), within=1.0)
    print(f"cold loads of its tasks back {took:.1f} s after the primary died, of every task {all_back:.1f} s")


def test_a_hung_node_costs_one_socket_timeout_per_call(
    cluster: RedisClusterServers, open_registry: Callable[..., PrefixRegistry]
) -> None:
    """Pipelines to a hung node fail after one socket timeout (1 s), not one per command in them (redis-py's
    cluster pipeline sends each timed-out command again on its own: a listing of 20 tasks took 21 s)."""
    writer = open_registry(cluster.url)
    tasks = [f"many{i}" for i in range(30)]
    for i, task in enumerate(tasks):
        writer.upload("acme", task, make_kv(seed=i))
    index_node = cluster.node_of("ps:{acme}:tasks")
    hung = next(n for n in cluster.nodes if n is not index_node)
    on_hung = [t for t in tasks if cluster.node_of(f"ps:{{acme/{t}}}:latest") is hung]
    assert len(on_hung) >= 3
    backend = RedisBackend(cluster.url)
    reader = backend.open_blob("acme", on_hung[0], 1, 64)
    assert hung.proc is not None
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        calls: dict[str, Callable[[], object]] = {
            "listing": lambda: backend.list_tasks("acme"),
            "headers": lambda: backend.latest_headers("acme", tasks),
            "pieces": lambda: reader.read([(i * 64, (i + 1) * 64) for i in range(8)]),
        }
        for what, call in calls.items():
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - start < 1.6, what
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    eventually(lambda: len(backend.list_tasks("acme")) == len(tasks), within=5.0)
    backend.close()


def test_cluster_urls_it_can_never_use_are_refused_at_startup(
    make_redis_cluster: Callable[..., RedisClusterServers], make_redis_server: Callable[..., RedisServer]
) -> None:
    """A wrong password, or a cluster URL to a Redis that is not a cluster: one error line before the model loads,
    not "unreachable, starting anyway" and a 503 on every request after."""
    cluster = make_redis_cluster(nodes=1, password="right-pw")
    port = cluster.nodes[0].port
    assert _store_problem(f"redis+cluster://:right-pw@127.0.0.1:{port}") is None
    wrong = _store_problem(f"redis+cluster://:wrong-pw@127.0.0.1:{port}")
    assert wrong is not None and "refused our credentials" in wrong and "wrong-pw" not in wrong
    plain = make_redis_server()
    not_a_cluster = _store_problem(f"redis+cluster://127.0.0.1:{plain.port}")
    assert not_a_cluster is not None and "is not a Redis Cluster" in not_a_cluster


def test_calls_behind_a_hung_seed_node_fail_together(cluster: RedisClusterServers) -> None:
    """The client is built by asking the URL's node for the slot map. While that node hangs, requests arriving
    together fail after one build's timeout, not one after the other (each had waited out its own build)."""
    backend = RedisBackend(cluster.url)  # nodes[0]; nothing built yet
    seed = cluster.nodes[0]
    assert seed.proc is not None
    seed.proc.send_signal(signal.SIGSTOP)
    took: list[float] = []

    def ask() -> None:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            backend.latest_version("acme", "sum")
        took.append(time.monotonic() - start)

    try:
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        seed.proc.send_signal(signal.SIGCONT)
    assert len(took) == 4 and max(took) < 2.0, took

    def answers() -> bool:
        try:
            return backend.latest_version("acme", "sum") is None
        except StoreUnavailable:
            return False

    eventually(answers, within=5.0)  # built once the node answers, no restart
    backend.close()


def test_the_tenant_lock_survives_a_lost_reply(cluster: RedisClusterServers) -> None:
    """``call`` sends a command again after a dropped connection; a lock SET whose reply was lost then finds our
    own token, which is ours to hold (before, the upload waited for its own lock and failed)."""
    backend = RedisBackend(cluster.url)
    client = backend.client
    set_command = client.set
    lost: list[bool] = []

    def set_then_lose_the_reply(*args: object, **kwargs: object) -> object:
        result = set_command(*args, **kwargs)  # type: ignore[arg-type]
        if not lost:
            lost.append(True)
            raise redis.ConnectionError("connection lost before the reply")
        return result

    client.set = set_then_lose_the_reply  # type: ignore[method-assign]
    start = time.monotonic()
    with backend.tenant_lock("acme"):
        assert lost and time.monotonic() - start < 1.0
        assert client.get("ps:{acme}:lock") is not None
    assert client.get("ps:{acme}:lock") is None  # released
    backend.close()


def test_several_seed_nodes_one_of_them_down(cluster: RedisClusterServers) -> None:
    """`redis+cluster://A,B`: the client asks the seeds in turn, so a first seed that is down at startup does not
    keep the server from the cluster; the whole list is shown (any password hidden) and checked."""
    down = f"127.0.0.1:{free_cluster_port()}"  # nothing listens there
    url = f"redis+cluster://{down},127.0.0.1:{cluster.nodes[1].port},127.0.0.1:{cluster.nodes[2].port}"
    assert _store_problem(url) is None
    backend = open_backend(url)
    assert backend.put("acme", "sum", lambda v: b"seeded") == 1 and backend.get("acme", "sum") == b"seeded"
    assert down in backend.describe()
    backend.close()
    with pytest.raises(ValueError, match="bad port"):
        open_backend(f"redis+cluster://127.0.0.1:{cluster.nodes[0].port},127.0.0.1:x")
