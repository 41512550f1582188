"""Disk backend: one file per version, written atomically.

Layout: root/<tenant>/<task_id>/v00000001.safetensors. A put writes a hidden
temp file in the task dir, fsyncs it, then `os.link`s it to the final name
(which fails if the version exists, so concurrent writers cannot overwrite
each other) and fsyncs the directory. Readers only ever open final names, so
a crash mid-write leaves at most a temp file, which is ignored.

Version numbers only grow, across deletes too: root/<tenant>/.seq/<task_id> holds the last one handed out, and
outlives the task's directory. A replica that missed a delete and the upload after it then sees a new number
where it has a version cached, never the old number with new content (Redis keeps its counter the same way).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prefix_store.backends.base import TENANT_LOCK_WAIT_S, BlobReader, PrefixBackend, wait_for_lock
from prefix_store.errors import PrefixNotFound, StoreUnavailable
from prefix_store.ids import validate_task_id, validate_tenant

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^v(\d{8})\.safetensors$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_SEQ_DIR = ".seq"  # per tenant: the last version handed out per task, kept across deletes
_TENANT_LOCK = ".lock"  # per tenant: flocked around a storage-quota check and its write (tenant_lock)
# A temp file this old belongs to a writer that died; pruning removes it.
_STALE_TMP_SECONDS = 3600.0
_MAX_PUT_ATTEMPTS = 100


def version_filename(version: int) -> str:
    return f"v{version:08d}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskBackend(PrefixBackend):
    def __init__(self, root: str | Path, *, keep_versions: int = 5) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.root = Path(root).expanduser()
        self.keep_versions = keep_versions
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"cannot create prefix store directory {self.root}: {e}") from e

    def describe(self) -> str:
        return f"disk store at {self.root.resolve()} (keeping {self.keep_versions} versions per task)"

    def _task_dir(self, tenant: str, task_id: str) -> Path:
        # Ids are validated again here so no caller can reach outside root.
        return self.root / validate_tenant(tenant) / validate_task_id(task_id)

    def _versions(self, task_dir: Path) -> list[int]:
        """Stored versions, ascending; [] if the task dir does not exist."""
        try:
            names = os.listdir(task_dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreUnavailable(f"cannot list {task_dir}: {e}") from e
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_RE.match(n)))

    def latest_version(self, tenant: str, task_id: str) -> int | None:
        versions = self._versions(self._task_dir(tenant, task_id))
        return versions[-1] if versions else None

    def _seq_file(self, tenant: str, task_id: str) -> Path:
        return self.root / validate_tenant(tenant) / _SEQ_DIR / validate_task_id(task_id)

    def _claim_version(self, seq_file: Path, after: int) -> int:
        """A version number above both ``after`` (the task's newest file) and every number handed out before,
        recorded as handed out (under an exclusive lock on the record, so concurrent writers never share one)."""
        fd = _open_record(seq_file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            recorded = os.pread(fd, 32, 0).strip()
            version = max(int(recorded or b"0"), after) + 1
            # Numbers only grow, so the new one is never shorter: written over the old, then cut to its length,
            # a crash leaves one of the two.
            text = str(version).encode()
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
            os.fsync(fd)
            return version
        except (OSError, ValueError) as e:
            raise StoreUnavailable(f"cannot claim a version in {seq_file}: {e}") from e
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """An exclusive flock on root/<tenant>/.lock, which every process on this directory takes."""
        path = self.root / validate_tenant(tenant) / _TENANT_LOCK
        fd = _open_record(path)

        def acquire() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        try:
            wait_for_lock(acquire, str(path), TENANT_LOCK_WAIT_S)
            yield
        finally:
            os.close(fd)  # releases the lock

    def put(self, tenant: str, task_id: str, encode: Callable[[int], bytes]) -> int:
        task_dir = self._task_dir(tenant, task_id)
        seq_file = self._seq_file(tenant, task_id)
        for _ in range(_MAX_PUT_ATTEMPTS):
            versions = self._versions(task_dir)
            version = self._claim_version(seq_file, versions[-1] if versions else 0)
            blob = encode(version)
            tmp = task_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            final = task_dir / version_filename(version)
            try:
                task_dir.mkdir(parents=True, exist_ok=True)
                with open(tmp, "xb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, final)  # fails if the version exists: never overwrite
                finally:
                    _unlink_quietly(tmp)
                _fsync_dir(task_dir)
            except FileExistsError:
                continue  # another writer took this version; retry with the next
            except FileNotFoundError:
                continue  # the task was deleted under us (tmp went with it); start again
            except OSError as e:
                raise StoreUnavailable(f"cannot write prefix to {final}: {e}") from e
            self._prune(task_dir)
            return version
        raise StoreUnavailable(f"could not claim a new version in {task_dir} after {_MAX_PUT_ATTEMPTS} attempts")

    def _prune(self, task_dir: Path) -> None:
        """Keep the newest `keep_versions` versions; drop stale temp files of dead writers."""
        for version in self._versions(task_dir)[: -self.keep_versions]:
            _unlink_quietly(task_dir / version_filename(version))
        try:
            entries = list(os.scandir(task_dir))
        except OSError:
            return
        now = time.time()
        for entry in entries:
            if entry.name.startswith(_TMP_PREFIX):
                try:
                    if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                        _unlink_quietly(Path(entry.path))
                except OSError:
                    pass

    def get(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        task_dir = self._task_dir(tenant, task_id)
        # Pruning may remove the latest-but-one between listing and opening: retry.
        for _ in range(3):
            v = version if version is not None else self.latest_version(tenant, task_id)
            if v is None:
                break
            path = task_dir / version_filename(v)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                if version is not None:
                    break
            except OSError as e:
                raise StoreUnavailable(f"cannot read {path}: {e}") from e
        which = f"version {version}" if version is not None else "any version"
        raise PrefixNotFound(f"prefix {task_id!r} not found ({which})")

    def open_blob(self, tenant: str, task_id: str, version: int, first_bytes: int) -> BlobReader:
        path = self._task_dir(tenant, task_id) / version_filename(version)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise PrefixNotFound(f"prefix {task_id!r} not found (version {version})") from None
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e}") from e
        try:
            return _FileReader(fd, path, first_bytes)
        except BaseException:
            os.close(fd)
            raise

    def list_tasks(self, tenant: str) -> list[str]:
        tenant_dir = self.root / validate_tenant(tenant)
        try:
            names = os.listdir(tenant_dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreUnavailable(f"cannot list {tenant_dir}: {e}") from e
        return sorted(
            n for n in names if not n.startswith(".") and (tenant_dir / n).is_dir() and self._versions(tenant_dir / n)
        )

    def delete(self, tenant: str, task_id: str) -> bool:
        task_dir = self._task_dir(tenant, task_id)
        trash = task_dir.parent / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            # One atomic rename: readers see either the whole task or nothing.
            os.rename(task_dir, trash)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreUnavailable(f"cannot delete {task_dir}: {e}") from e
        shutil.rmtree(trash, ignore_errors=True)
        return True


def _open_record(path: Path) -> int:
    """A small file of the store's own (created with its directory if need be), opened for reading and writing and
    locking: the caller closes the descriptor, which releases any lock taken on it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreUnavailable(f"cannot open {path}: {e}") from e


class _FileReader(BlobReader):
    """Ranges of one version's file, read from a descriptor opened once: a version file never changes, and a
    prune or delete that unlinks it meanwhile leaves the open file readable to the end."""

    def __init__(self, fd: int, path: Path, first_bytes: int) -> None:
        self._fd, self._path = fd, path
        try:
            self.size = os.fstat(fd).st_size
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e}") from e
        self.first = self._pread(0, min(first_bytes, self.size))

    def _pread(self, start: int, end: int) -> bytes:
        try:
            data = os.pread(self._fd, end - start, start)
        except OSError as e:
            raise StoreUnavailable(f"cannot read {self._path}: {e}") from e
        if len(data) != end - start:
            raise StoreUnavailable(f"cannot read {self._path}: it ended at {start + len(data)}, not {end}")
        return data

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self._pread(start, end) for start, end in ranges]

    def close(self) -> None:
        os.close(self._fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)
