import os
import threading
import time
from pathlib import Path

import pytest

from prefix_store.backends import DiskBackend, RedisBackend, default_store_url, open_backend
from prefix_store.errors import InvalidTaskId, PrefixNotFound, StoreUnavailable


def blob_for(version: int) -> bytes:
    return f"blob v{version}".encode()


@pytest.fixture
def store(tmp_path: Path) -> DiskBackend:
    return DiskBackend(tmp_path / "store")


def test_versions_increase_and_get(store: DiskBackend) -> None:
    assert store.latest_version("acme", "sum") is None
    assert [store.put("acme", "sum", blob_for) for _ in range(3)] == [1, 2, 3]
    assert store.latest_version("acme", "sum") == 3
    assert store.get("acme", "sum") == b"blob v3"
    assert store.get("acme", "sum", 2) == b"blob v2"
    assert (store.root / "acme" / "sum" / "v00000001.safetensors").read_bytes() == b"blob v1"
    with pytest.raises(PrefixNotFound):
        store.get("acme", "sum", 4)
    with pytest.raises(PrefixNotFound):
        store.get("acme", "other")


def test_tenants_are_separate_and_listed(store: DiskBackend) -> None:
    store.put("acme", "b", blob_for)
    store.put("acme", "a", blob_for)
    store.put("umbrella", "a", blob_for)
    assert store.list_tasks("acme") == ["a", "b"]
    assert store.list_tasks("umbrella") == ["a"]
    assert store.list_tasks("nobody") == []
    with pytest.raises(PrefixNotFound):
        store.get("umbrella", "b")


def test_delete_removes_all_versions(store: DiskBackend) -> None:
    store.put("acme", "sum", blob_for)
    store.put("acme", "sum", blob_for)
    assert store.delete("acme", "sum") is True
    assert store.delete("acme", "sum") is False
    assert store.latest_version("acme", "sum") is None
    assert store.list_tasks("acme") == []
    with pytest.raises(PrefixNotFound):
        store.get("acme", "sum")
    assert os.listdir(store.root / "acme") == [".seq"]  # the trash dir is gone too; the version record stays
    # Numbers only grow: a replica that missed the delete and this upload sees a new version, not v1 again.
    assert store.put("acme", "sum", blob_for) == 3
    assert store.list_tasks("acme") == ["sum"] and store.get("acme", "sum") == b"blob v3"


def test_pruning_keeps_newest_versions(tmp_path: Path) -> None:
    store = DiskBackend(tmp_path, keep_versions=2)
    for _ in range(5):
        store.put("acme", "sum", blob_for)
    assert sorted(os.listdir(tmp_path / "acme" / "sum")) == ["v00000004.safetensors", "v00000005.safetensors"]
    with pytest.raises(PrefixNotFound):
        store.get("acme", "sum", 1)
    assert store.get("acme", "sum") == b"blob v5"


def test_crash_leftovers_are_never_read(store: DiskBackend) -> None:
    store.put("acme", "sum", blob_for)
    task_dir = store.root / "acme" / "sum"
    # A writer that died after writing half its temp file.
    stale = task_dir / ".tmp-deadbeef"
    stale.write_bytes(b"blob v2 (partial")
    assert store.latest_version("acme", "sum") == 1
    assert store.get("acme", "sum") == b"blob v1"
    assert store.list_tasks("acme") == ["sum"]
    # A task dir holding nothing but a temp file is not a task.
    (store.root / "acme" / "ghost").mkdir()
    (store.root / "acme" / "ghost" / ".tmp-x").write_bytes(b"partial")
    assert store.list_tasks("acme") == ["sum"]
    assert store.put("acme", "sum", blob_for) == 2
    assert stale.exists()  # fresh: a live writer may still own it
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    store.put("acme", "sum", blob_for)
    assert not stale.exists()


def test_failed_write_leaves_previous_version(store: DiskBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put("acme", "sum", blob_for)

    real_fsync, calls = os.fsync, []

    def broken_fsync(fd: int) -> None:  # the version's number is claimed; writing its file fails
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StoreUnavailable, match=r"v00000002\.safetensors"):
        store.put("acme", "sum", blob_for)
    monkeypatch.undo()
    assert store.latest_version("acme", "sum") == 1
    assert store.get("acme", "sum") == b"blob v1"
    assert store.put("acme", "sum", blob_for) >= 2


def test_failing_encode_stores_nothing(store: DiskBackend) -> None:
    def encode(version: int) -> bytes:
        raise ValueError("bad prefix")

    with pytest.raises(ValueError):
        store.put("acme", "sum", encode)
    assert store.latest_version("acme", "sum") is None


def test_concurrent_puts_get_distinct_versions(tmp_path: Path) -> None:
    store = DiskBackend(tmp_path, keep_versions=1000)
    threads, per_thread = 8, 6
    barrier = threading.Barrier(threads)
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for _ in range(per_thread):
            v = store.put("acme", "sum", blob_for)
            with lock:
                results.append(v)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = threads * per_thread
    assert sorted(results) == list(range(1, total + 1))
    for v in range(1, total + 1):
        assert store.get("acme", "sum", v) == blob_for(v)  # each blob was encoded for its own number
    assert not [n for n in os.listdir(tmp_path / "acme" / "sum") if n.startswith(".")]


@pytest.mark.parametrize(("tenant", "task"), [("../x", "t"), ("acme", "../x"), ("acme", "a/b"), ("", "t")])
def test_path_tricks_rejected(store: DiskBackend, tenant: str, task: str) -> None:
    with pytest.raises(InvalidTaskId):
        store.put(tenant, task, blob_for)
    with pytest.raises(InvalidTaskId):
        store.get(tenant, task)


def test_unusable_root_is_store_unavailable(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreUnavailable, match="afile"):
        DiskBackend(afile / "store")


def test_open_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = open_backend(f"disk://{tmp_path}/a")
    assert isinstance(a, DiskBackend) and a.root == tmp_path / "a"
    assert str(tmp_path / "a") in a.describe()
    b = open_backend(str(tmp_path / "b"))
    assert isinstance(b, DiskBackend) and b.root == tmp_path / "b"
    # Redis URLs open lazily (nothing listens here); the password never shows.
    for url in ("redis://u:sekrit@localhost:1/0", "rediss://u:sekrit@localhost:1/2"):
        r = open_backend(url)
        assert isinstance(r, RedisBackend) and "sekrit" not in r.describe() and "localhost:1" in r.describe()
        r.close()
    with pytest.raises(ValueError, match="scheme"):
        open_backend("s3://bucket")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_store_url() == f"disk://{tmp_path}/xdg/prefix-serve/prefixes"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_url() == f"disk://{tmp_path}/home/.local/share/prefix-serve/prefixes"
