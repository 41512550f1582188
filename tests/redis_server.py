"""A real redis-server process on a free loopback port, restartable on that port (for fault tests)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (and so below 65536)."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a certificate it signed for 127.0.0.1 and localhost (the server's), and one it
    signed for a client (for servers that require client certificates)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        import trustme

        ca = trustme.CA()
        server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("prefix-serve-client")
        files = cls(*(directory / name for name in ("ca.pem", "cert.pem", "key.pem", "client.pem", "client-key.pem")))
        ca.cert_pem.write_to_path(str(files.ca))
        server.cert_chain_pems[0].write_to_path(str(files.cert))
        server.private_key_pem.write_to_path(str(files.key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        return files


class RedisServer:
    """One redis-server process on a fixed loopback port, restartable on that port."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistent: bool = False,
        password: str | None = None,
        cluster: bool = False,
        node_timeout_ms: int = 5000,
        tls: TlsFiles | None = None,
        tls_auth_clients: bool = False,
    ) -> None:
        self.port = free_cluster_port() if cluster else free_port()
        self.workdir = workdir
        self.persistent = persistent  # AOF with fsync always, so a restart keeps what was written
        self.password = password
        self.cluster = cluster  # a Redis Cluster node: its nodes.conf in workdir lets a restart rejoin
        self.cluster_node_timeout_ms = node_timeout_ms  # how long a silent node takes to be marked failed (replaced)
        self.tls = tls  # TLS only: the port speaks nothing else (and, on a cluster node, so does its bus)
        self.tls_auth_clients = tls_auth_clients  # TLS clients must show a certificate the CA signed
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis(
                port=self.port,
                password=self.password,
                socket_timeout=2,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
                ssl_certfile=str(self.tls.client_cert),
                ssl_keyfile=str(self.tls.client_key),
            )
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def start(self) -> None:
        args = [
            "redis-server",
            *(("--port", "0", "--tls-port") if self.tls else ("--port",)),
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
        ]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.ca)]
            args += ["--tls-auth-clients", "yes" if self.tls_auth_clients else "no"]
            if self.cluster:
                args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.cluster_node_timeout_ms),
                "--repl-diskless-sync-delay",  # a replica's first sync starts at once (the default waits 5 s)
                "0",
            ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = self.client()
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.01)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.kill()


class RedisClusterServers:
    """A Redis Cluster of real redis-server nodes on loopback: primaries with the 16,384 slots split evenly, and
    optionally one replica of each (``replicas[i]`` follows ``nodes[i]``)."""

    SLOTS = 16384

    def __init__(self, nodes: list[RedisServer], replicas: list[RedisServer] | None = None) -> None:
        self.replicas = replicas or []
        assert nodes and all(node.cluster for node in [*nodes, *self.replicas])
        assert not self.replicas or len(self.replicas) == len(nodes)
        self.nodes = nodes

    @property
    def members(self) -> list[RedisServer]:
        return [*self.nodes, *self.replicas]

    @property
    def url(self) -> str:
        """The store URL: any one node is enough, the client discovers the rest."""
        tls = self.nodes[0].tls
        if tls:
            return f"rediss+cluster://127.0.0.1:{self.nodes[0].port}/0?ssl_ca_certs={tls.ca}"
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def form(self, timeout: float = 20.0) -> None:
        """Give each node its share of the slots, introduce them, and wait until every node says the cluster is ok."""
        clients = [node.client() for node in self.nodes]
        share = self.SLOTS // len(self.nodes)
        for i, client in enumerate(clients):
            # Distinct config epochs from the start: nodes that all begin at epoch 0 settle the collision by
            # gossip first, which takes seconds.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            last = self.SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for member in self.members[1:]:
            with member.client() as client:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
        self.wait_ok(timeout)
        for primary, replica in zip(self.nodes, self.replicas, strict=False):
            primary_id = primary.client().execute_command("CLUSTER", "MYID")
            with replica.client() as client:
                deadline = time.monotonic() + timeout
                while True:  # the replica may not have heard of the primary's id yet
                    try:
                        client.execute_command("CLUSTER", "REPLICATE", primary_id)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                while client.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica on port {replica.port} did not sync")
                    time.sleep(0.05)
        self.wait_ok(timeout)
        for client in clients:
            client.close()

    def wait_ok(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        members = [node for node in self.members if node.proc is not None and node.proc.poll() is None]
        clients = [node.client() for node in members]
        try:
            while True:
                infos = [client.execute_command("CLUSTER", "INFO") for client in clients]
                texts = [info.decode() if isinstance(info, bytes) else str(info) for info in infos]
                if all(
                    "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.members)}" in text for text in texts
                ):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis cluster did not form: {texts}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def node_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s slot."""
        slot = key_slot(key.encode())  # computed here: asking a node fails while that node is down
        return self.nodes[min(slot // (self.SLOTS // len(self.nodes)), len(self.nodes) - 1)]
