"""Redis backend: versioned blobs, written atomically, with pub/sub invalidation.

Key layout (T = tenant, K = task id; both validated, so they never contain
"{", "}" or ":"). The hash tag `{T/K}` puts every key of one task in one
Redis Cluster slot, so a version write is a single-slot Lua script:

    ps:{T/K}:seq     STRING  version allocator (INCR); survives deletes so a
                             version number is never reused and a replica's
                             cached vN can never be mistaken for a newer upload
    ps:{T/K}:latest  STRING  newest stored version (the latest pointer)
    ps:{T/K}:v:N     STRING  the artifact bytes of version N (a string, not a hash
                             field, so large blobs can be read in ranges: GETRANGE)
    ps:{T/K}:head    HASH    version -> the artifact's safetensors header
                             (listing and info read it, not the tensors); its
                             fields are also the task's stored versions
    ps:{T}:tasks     SET     the tenant's task ids (the listing index)

The server keeps the Responses API's stored responses beside them, under `ps:{T}:resp...` and `ps:{T}:item:...`
(server/api/response_store.py, with a TTL; these keys have none).

Stores written before blobs were strings hold them in `ps:{T/K}:blob`, a HASH
version -> bytes: reads fall back to it, and deletes and pruning clear it.

The blob, its header and the latest pointer change together inside one
script, as does pruning to the newest `keep_versions`. The scripts name the
version keys they prune or delete from the task's key prefix: those keys share
the task's hash tag, so they are in the slot of the keys the script declares.
The tenant index lives in another slot, so it is updated separately and
idempotently: an entry may outlive its task (listing skips tasks with no latest
pointer), but a stored version always has an entry (see `put` and `delete`).

Writes publish `{"tenant", "task_id", "version"}` (version null for a delete)
on `ps:invalidate:<db>` from inside the same script, so a notification is
sent exactly when the write happens; `subscribe` delivers them to other
replicas.

Redis Cluster: `redis+cluster://HOST:PORT` (or `rediss+cluster://`), any one
node; the client finds the others and routes each command by its key's slot.
Nothing above changes: every script's keys share one hash tag, pipelines span
slots only without transactions, and a PUBLISH reaches every node's
subscribers. Only database 0 exists there. The cluster client connects when
constructed, so it is built on first use (an unreachable cluster at startup is
StoreUnavailable on use, as for one Redis) and again after a failed attempt.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.commands.core import Script
from redis.exceptions import AskError, NoScriptError, RedisClusterException
from redis.retry import Retry

from prefix_store.backends.base import (
    TENANT_LOCK_WAIT_S,
    BlobReader,
    Invalidation,
    PrefixBackend,
    WholeBlobReader,
    wait_for_lock,
)
from prefix_store.backends.redis_url import (
    CLUSTER_SCHEMES,
    check_options,
    connection_hint,
    host_and_port,
    redact_url,
    untrusted_certificate,
    url_passwords,
)
from prefix_store.errors import CorruptPrefix, PrefixNotFound, StoreUnavailable
from prefix_store.ids import validate_task_id, validate_tenant

logger = logging.getLogger(__name__)

# Short timeouts so a dead or unreachable Redis fails a cold request in well
# under 2 s instead of hanging; `?socket_timeout=...` in the URL overrides them.
DEFAULT_CONNECT_TIMEOUT = 0.5
DEFAULT_SOCKET_TIMEOUT = 1.0
# Tasks whose headers one listing round trip reads (a few KiB each).
_LIST_BATCH = 500
# Subscriber reconnect backoff: doubles from the first value up to the cap.
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 1.0

# KEYS: latest, head, the version's blob, the legacy blob hash.
# ARGV: version, blob, header, keep, channel, message, the prefix of version keys ("ps:{T/K}:v:").
# Returns the latest version after the write.
_PUT_SCRIPT = """
local v = tonumber(ARGV[1])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local latest = tonumber(redis.call('GET', KEYS[1])) or 0  -- an unreadable pointer is replaced
if v > latest then
  redis.call('SET', KEYS[1], ARGV[1])
  latest = v
end
local keep = tonumber(ARGV[4])
local stored = redis.call('HKEYS', KEYS[2])
if #stored > keep then
  local versions = {}
  for i, s in ipairs(stored) do versions[i] = tonumber(s) end
  table.sort(versions)
  for i = 1, #versions - keep do
    redis.call('DEL', ARGV[7] .. versions[i])
    redis.call('HDEL', KEYS[2], versions[i])
    redis.call('HDEL', KEYS[4], versions[i])
  end
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return latest
"""

# KEYS: seq, latest, head. Returns a version number never handed out before: INCR's, unless the counter is behind
# what is stored (evicted by an allkeys-* maxmemory-policy, or edited): then one above the latest and every stored
# version, so an upload can neither overwrite a kept version nor be pruned at once as the oldest.
_ALLOCATE_SCRIPT = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(redis.call('GET', KEYS[2])) or 0
for _, s in ipairs(redis.call('HKEYS', KEYS[3])) do
  local n = tonumber(s)
  if n and n > floor then floor = n end
end
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
return v
"""

# KEYS: latest, a version -> bytes hash. ARGV: the prefix of version keys, or "" to read the hash alone.
# Returns {version, bytes} of the latest (its string key first, then the hash's field), or nil.
_GET_LATEST_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
local data = false
if ARGV[1] ~= '' then data = redis.call('GET', ARGV[1] .. v) end
if not data then data = redis.call('HGET', KEYS[2], v) end
if not data then return nil end
return {v, data}
"""

# KEYS: latest, head, the legacy blob hash. ARGV: channel, message, the prefix of version keys.
# Returns the number of keys removed.
_DELETE_SCRIPT = """
local n = 0
for _, v in ipairs(redis.call('HKEYS', KEYS[2])) do
  n = n + redis.call('DEL', ARGV[3] .. v)
end
n = n + redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if n > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
"""


# KEYS: a lock. ARGV: the token its holder set. Deletes it only if that holder still has it.
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# What redis-py raises when a command or connection fails; a cluster client that cannot find its nodes raises
# RedisClusterException, which is not a RedisError.
_REDIS_ERRORS = (redis.RedisError, RedisClusterException)
# Errors Redis replies with (CLUSTERDOWN, TRYAGAIN, LOADING, READONLY, NOPERM, OOM...), as opposed to a connection
# that fails or times out: asking again costs a round trip, not a timeout.
_ANSWERS = (redis.ResponseError, redis.exceptions.BusyLoadingError)
# After a cluster client could not be built (no node answered), calls fail at once for this long.
_CLUSTER_BUILD_RETRY_S = 0.5
# A tenant lock expires after this long (an upload of 64 MiB to Redis takes well under a second).
_TENANT_LOCK_MS = 30_000


def _header_of(blob: bytes) -> bytes:
    """The safetensors header (8-byte little-endian length + JSON) at the start of `blob`.

    The backend otherwise never looks inside blobs; this framing is all it needs
    to let listings skip the tensor bytes. A malformed blob yields what is there,
    and the registry reports it when it parses the header.
    """
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0
    return blob[: 8 + n]


class RedisBackend(PrefixBackend):
    def __init__(
        self,
        url: str,
        *,
        keep_versions: int = 5,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.keep_versions = keep_versions
        self._safe_url = redact_url(url)
        self._passwords = url_passwords(url)
        scheme, _, rest = url.partition("://")
        self.cluster = scheme.lower() in CLUSTER_SCHEMES
        path = urlsplit(url).path.strip("/")
        if path and not path.isdigit():
            # redis-py would take a path it cannot read as database 0, silently.
            raise ValueError(f"bad redis store URL {self._safe_url!r}: the path must be a database number, e.g. /0")
        options: dict[str, Any] = dict(
            socket_connect_timeout=socket_connect_timeout,
            socket_timeout=socket_timeout,
            # One immediate retry on a dropped connection: the first command on a pooled
            # connection to a restarted Redis fails and the retry reconnects. Timeouts are
            # not retried: a hung Redis would then cost twice the timeout, over the 2 s budget.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            # Lets the subscriber notice a silently dead connection (no RST).
            health_check_interval=5,
        )
        self._connect_lock = threading.Lock()
        self._connected: redis.Redis | redis.RedisCluster | None = None
        self._build_retry_at, self._build_error = 0.0, ""  # a cluster client's last failed build
        if self.cluster:
            db_query = [value for name, value in parse_qsl(urlsplit(url).query) if name == "db"]
            if path not in ("", "0") or any(value != "0" for value in db_query):
                raise ValueError(f"bad redis store URL {self._safe_url!r}: a Redis Cluster has only database 0")
            # Several seed nodes may be named, comma-separated: the client asks them in turn for the slot map, so
            # one seed that is down when the server starts does not keep it from the cluster.
            parts = urlsplit(f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}")
            userinfo, at, hosts = parts.netloc.rpartition("@")
            first, *others = hosts.split(",")
            self._client_url = urlunsplit(parts._replace(netloc=f"{userinfo}{at}{first}"))
            try:
                check_options(self._client_url)  # the client, and so its connections, is only built on first use
                seeds = [ClusterNode(*host_and_port(other)) for other in others]
            except ValueError as e:
                raise ValueError(f"bad redis store URL {self._safe_url!r}: {e}") from None
            # The cluster client retries timeouts too (its retry ignores supported_errors): a hung node would cost
            # two socket timeouts. It does not retry; `call` retries a dropped connection once instead.
            self._options = {**options, "retry": Retry(NoBackoff(), 0), "startup_nodes": seeds}
            self._db = 0
        else:
            try:
                check_options(url)  # options redis-py would only fail on when it connects
                self._connected = redis.Redis.from_url(url, **options)  # connects on first command
            except ValueError as e:
                raise ValueError(f"bad redis store URL {self._safe_url!r}: {e}") from None
            self._db = int(self._connected.connection_pool.connection_kwargs.get("db", 0) or 0)
        # Pub/sub is not scoped by database: name the channel after it so two
        # deployments on one server in different dbs do not invalidate each other.
        self.channel = f"ps:invalidate:{self._db}"
        self._allocate_script = self.register_script(_ALLOCATE_SCRIPT)
        self._put_script = self.register_script(_PUT_SCRIPT)
        self._get_latest_script = self.register_script(_GET_LATEST_SCRIPT)
        self._delete_script = self.register_script(_DELETE_SCRIPT)
        self._unlock_script = self.register_script(_UNLOCK_SCRIPT)
        # Each entry returns the callback, or None once its owner is gone (see subscribe).
        self._callbacks: list[Callable[[], Callable[[Invalidation], None] | None]] = []
        self._subscriber: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._closed = threading.Event()
        self._sub_lock = threading.Lock()

    @property
    def _client(self) -> redis.Redis | redis.RedisCluster:
        """The client; a cluster's is built here on first use (its constructor asks a node for the slot map)."""
        client = self._connected
        if client is not None:
            return client
        with self._connect_lock:
            if self._connected is None:
                if self._closed.is_set():
                    raise redis.ConnectionError("the store is closed")
                if time.monotonic() < self._build_retry_at:
                    # Requests waiting on the lock behind a failed build (each ~1 s against a hung node) fail
                    # at once with its error instead of each building again in turn.
                    raise RedisClusterException(self._build_error)
                try:
                    self._connected = redis.RedisCluster.from_url(self._client_url, **self._options)
                except ValueError as e:
                    raise ValueError(f"bad redis store URL {self._safe_url!r}: {e}") from None
                except RedisClusterException as e:
                    self._build_retry_at = time.monotonic() + _CLUSTER_BUILD_RETRY_S
                    self._build_error = str(e)
                    raise
            return self._connected

    def register_script(self, text: str) -> Callable[..., Any]:
        """A Lua script, run as ``script(keys=[...], args=[...], client=pipeline_or_None)`` against this store's
        client (the cluster's, once there is one). Loaded on first use, and again on a node that lost it."""
        script = Script(None, text.encode())  # bytes: the SHA needs no client's encoder

        def run(keys: Sequence[Any], args: Sequence[Any], client: Any = None) -> Any:
            if not self.cluster or client is not None:
                return script(keys=keys, args=args, client=client if client is not None else self._client)
            # redis-py answers NOSCRIPT by loading the script on every primary, which fails while any node is
            # down, even for a key on a live one. EVAL goes to the key's node alone and caches it there.
            try:
                return self._client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return self._client.eval(text, len(keys), *keys, *args)

        return run

    @contextlib.contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """``ps:{T}:lock``, set if absent with a token of ours and an expiry (a replica that dies holding it does
        not hold it for ever), deleted only while it still holds our token."""
        key = f"ps:{{{validate_tenant(tenant)}}}:lock"
        token = secrets.token_hex(8)

        def take() -> bool:
            # Or ours already: `call` may send the SET again after a reply was lost, and it finds our own token.
            return (
                bool(self._client.set(key, token, nx=True, px=_TENANT_LOCK_MS))
                or self._client.get(key) == token.encode()
            )

        wait_for_lock(
            lambda: bool(self.call("locking the tenant", take)),
            f"tenant {tenant!r}'s upload lock",
            TENANT_LOCK_WAIT_S,
        )
        try:
            yield
        finally:
            with contextlib.suppress(StoreUnavailable):  # it expires by itself
                self.call("unlocking the tenant", lambda: self._unlock_script(keys=[key], args=[token]))

    def check(self) -> None:
        try:
            self._client.ping()
            if not self.cluster and _cluster_enabled(self._client):
                raise ValueError(
                    f"redis store at {self._safe_url} is a Redis Cluster node: name it redis+cluster://"
                    f" (or rediss+cluster://), so that each key goes to the node that holds it"
                )
            if (policy := _evicting_policy(self._client)) is not None:
                logger.warning(
                    "redis store at %s evicts keys when its memory is full (maxmemory-policy %s): prefixes would be"
                    " lost, whole or in part (a listed task that no longer loads, orphaned blobs); set"
                    " maxmemory-policy noeviction, so that an upload that does not fit is refused (503) instead",
                    self._safe_url,
                    policy,
                )
        except _REDIS_ERRORS as e:
            # A cluster client that could not be built says why in its cause (a refused password, say).
            cause = e.__cause__ if isinstance(e, RedisClusterException) and e.__cause__ is not None else e
            if isinstance(cause, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
                detail = self._scrub(str(cause))
                raise ValueError(f"redis store at {self._safe_url} refused our credentials: {detail}") from e
            if isinstance(cause, redis.ResponseError):  # e.g. "invalid DB index" when the connection selects it
                raise ValueError(f"redis store at {self._safe_url}: {self._scrub(str(cause))}") from e
            if "Cluster mode is not enabled" in str(e):
                raise ValueError(
                    f"redis store at {self._safe_url} is not a Redis Cluster: name it redis://HOST:PORT/DB"
                ) from e
            if (refused := untrusted_certificate(e)) is not None:
                raise ValueError(
                    f"redis store at {self._safe_url}: its TLS certificate failed verification"
                    f" ({refused.verify_message}); name the CA that signed it with ?ssl_ca_certs=PATH"
                ) from e
            hint = connection_hint(e, tls=self._safe_url.lower().startswith("rediss"))
            raise StoreUnavailable(f"redis store at {self._safe_url} unreachable: {self._scrub(str(e))}{hint}") from e

    @property
    def client(self) -> redis.Redis | redis.RedisCluster:
        """The connection pool's client, for other documents kept beside the prefixes (use ``call`` around it)."""
        return self._client

    def describe(self) -> str:
        return f"redis store at {self._safe_url} (keeping {self.keep_versions} versions per task)"

    def fault_domain(self, tenant: str, task_id: str | None = None) -> str | None:
        """On a cluster, the node that holds the task's slot as the client last heard ("host:port"): with one node
        down, tasks on the others still load; without a task (a listing reads every node), None: no one node can
        be blamed. One Redis, or a cluster client not built yet: the whole store."""
        client = self._connected
        if not self.cluster or client is None:
            return ""
        if task_id is None:
            return None
        key = self._task_keys(tenant, task_id)[1]
        try:
            return str(client.get_node_from_key(key).name)  # type: ignore[union-attr]
        except (RedisClusterException, AttributeError):  # no node holds the slot now
            return ""

    # -- keys -----------------------------------------------------------------

    @staticmethod
    def _tag(tenant: str, task_id: str) -> str:
        """The key prefix of one task: "ps:{tenant/task}" (the braces make it the Cluster hash tag)."""
        return f"ps:{{{tenant}/{task_id}}}"

    def _task_keys(self, tenant: str, task_id: str) -> tuple[str, str, str, str]:
        """(seq, latest, head, legacy blob hash) keys, all in one slot. Ids are validated: no braces get in."""
        tag = self._tag(validate_tenant(tenant), validate_task_id(task_id))
        return f"{tag}:seq", f"{tag}:latest", f"{tag}:head", f"{tag}:blob"

    def _version_prefix(self, tenant: str, task_id: str) -> str:
        """The prefix of the task's version keys: version N's blob is at this + "N"."""
        return f"{self._tag(validate_tenant(tenant), validate_task_id(task_id))}:v:"

    @staticmethod
    def _index_key(tenant: str) -> str:
        return f"ps:{{{validate_tenant(tenant)}}}:tasks"

    def _message(self, tenant: str, task_id: str, version: int | None) -> str:
        return json.dumps({"tenant": tenant, "task_id": task_id, "version": version})

    def _scrub(self, text: str) -> str:
        # redis-py's messages name host and port, not the password; make sure of it.
        for password in self._passwords:
            text = text.replace(password, "***")
        return text

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one Redis operation, turning redis-py's errors into StoreUnavailable.

        On a cluster a dropped connection (a node restarted or moved) is tried once more, as the one-server
        client's own retry does; a timeout is not. Every operation here may run twice: a version number
        allocated twice leaves a gap, and the scripts write or delete the same thing again.
        """
        try:
            try:
                return fn()
            except redis.ConnectionError:
                if not self.cluster:
                    raise
                return fn()
        except _REDIS_ERRORS as e:
            detail = self._scrub(str(e)) or type(e).__name__
            if isinstance(e, redis.AuthenticationError):  # redis-py 8 words a missing password as HELLO's rule
                detail = f"it refused our credentials (the password or user in the store URL): {detail}"
            answered = isinstance(e, _ANSWERS)
            raise StoreUnavailable(
                f"redis store at {self._safe_url} unavailable ({what}): {detail}", answered=answered
            ) from e

    # -- writes ---------------------------------------------------------------

    def put(self, tenant: str, task_id: str, encode: Callable[[int], bytes]) -> int:
        seq, latest, head_key, legacy_key = self._task_keys(tenant, task_id)
        prefix = self._version_prefix(tenant, task_id)
        index = self._index_key(tenant)

        # Index first: if the script below fails after running (connection lost
        # mid-reply), the version still has an index entry. A leftover entry
        # without versions is harmless.
        self.call("indexing a task", lambda: self._client.sadd(index, task_id))
        # INCR hands out each number once, so concurrent puts never collide and
        # `encode` is called exactly once.
        version = int(
            self.call("allocating a version", lambda: self._allocate_script(keys=[seq, latest, head_key], args=[]))
        )
        blob = encode(version)
        self.call(
            "writing a version",
            lambda: self._put_script(
                keys=[latest, head_key, f"{prefix}{version}", legacy_key],
                args=[
                    version,
                    blob,
                    _header_of(blob),
                    self.keep_versions,
                    self.channel,
                    self._message(tenant, task_id, version),
                    prefix,
                ],
            ),
        )
        # Again after the write: a concurrent delete may have removed the entry
        # between our SADD and the script (see `delete` for the other half).
        self.call("indexing a task", lambda: self._client.sadd(index, task_id))
        return version

    def delete(self, tenant: str, task_id: str) -> bool:
        _, latest, head_key, legacy_key = self._task_keys(tenant, task_id)
        prefix = self._version_prefix(tenant, task_id)
        index = self._index_key(tenant)
        removed = self.call(
            "deleting a task",
            lambda: self._delete_script(
                keys=[latest, head_key, legacy_key],
                args=[self.channel, self._message(tenant, task_id, None), prefix],
            ),
        )

        def unindex() -> None:
            self._client.srem(index, task_id)
            # A put that wrote after our script but indexed before our SREM would be
            # left unlisted: put its entry back if the task has versions again.
            if self._client.exists(latest):
                self._client.sadd(index, task_id)

        try:
            self.call("unindexing a task", unindex)
        except StoreUnavailable as e:
            # The versions are gone (the script ran); an index entry without them is skipped by listings, as
            # one left by an interrupted put is. On a cluster the index may be on a node that is down now.
            logger.warning("deleted %s/%s, but its listing entry stays for now: %s", tenant, task_id, e)
        return int(removed) > 0

    # -- reads ----------------------------------------------------------------

    def latest_version(self, tenant: str, task_id: str) -> int | None:
        _, latest, _, _ = self._task_keys(tenant, task_id)
        raw = self.call("reading the latest version", lambda: self._client.get(latest))
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise CorruptPrefix(f"prefix {task_id!r}: its latest-version pointer holds {raw[:20]!r}") from None

    def _read(self, tenant: str, task_id: str, version: int | None, head: bool) -> bytes:
        _, latest, head_key, legacy_key = self._task_keys(tenant, task_id)
        prefix = "" if head else self._version_prefix(tenant, task_id)
        fields = head_key if head else legacy_key
        if version is None:
            # Pointer and bytes in one script: never a pointer without its blob.
            found = self.call("reading a prefix", lambda: self._get_latest_script(keys=[latest, fields], args=[prefix]))
            data = found[1] if found else None
        elif head:
            data = self.call("reading a prefix", lambda: self._client.hget(head_key, str(version)))
        else:
            data = self.call("reading a prefix", lambda: self._client.get(f"{prefix}{version}"))
            if data is None:  # stored before blobs were strings
                data = self.call("reading a prefix", lambda: self._client.hget(legacy_key, str(version)))
        if data is None:
            which = f"version {version}" if version is not None else "any version"
            raise PrefixNotFound(f"prefix {task_id!r} not found ({which})")
        return bytes(data)

    def get(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        return self._read(tenant, task_id, version, head=False)

    def get_header(self, tenant: str, task_id: str, version: int | None = None) -> bytes:
        return self._read(tenant, task_id, version, head=True)

    def latest_headers(self, tenant: str, task_ids: Sequence[str]) -> dict[str, bytes]:
        # One pipeline of the get-latest script per batch of tasks: 10,000 one-at-a-time reads took 7.6 s here.
        out: dict[str, bytes] = {}
        for start in range(0, len(task_ids), _LIST_BATCH):
            batch = task_ids[start : start + _LIST_BATCH]

            def fetch(batch: Sequence[str] = batch) -> list[Any]:
                if self.cluster:
                    return self._latest_headers_on_cluster(tenant, batch)
                pipe = self._client.pipeline(transaction=False)
                for task_id in batch:
                    _, latest, head_key, _ = self._task_keys(tenant, task_id)
                    self._get_latest_script(keys=[latest, head_key], args=[""], client=pipe)
                results = pipe.execute(raise_on_error=False)
                # A key of the wrong type (edited by hand) spoils its own task, not the listing; any other error
                # is the store's (NOPERM, LOADING...), for every task.
                errors = [r for r in results if isinstance(r, redis.ResponseError)]
                if spoiling := [e for e in errors if not str(e).startswith("WRONGTYPE")]:
                    raise spoiling[0]
                return results

            for task_id, found in zip(batch, self.call("listing prefixes", fetch), strict=True):
                if isinstance(found, redis.ResponseError):
                    logger.warning("listing %s/%s: its keys are unreadable (%s); left out", tenant, task_id, found)
                elif found:  # nil: deleted since it was listed
                    out[task_id] = bytes(found[1])
        return out

    def _pipelined(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The results of `commands`, each ``(name, key, *args)`` of a redis-py command, in one round trip.

        On a cluster: one plain pipeline per node that holds some of the keys. redis-py's cluster pipeline sends
        each command that timed out again, one at a time, each waiting out its own timeout (a listing of 20 tasks
        on a hung node took 21 s); here a hung node costs one. Moved slots (a failover, resharding) are learnt
        and the commands sent once more; a refused connection makes the client learn the map again before
        ``call`` retries (the node may have been replaced).
        """
        client = self._client
        if not self.cluster:
            pipe = client.pipeline(transaction=False)
            for name, *args in commands:
                getattr(pipe, name)(*args)
            return pipe.execute()
        assert isinstance(client, redis.RedisCluster)
        try:
            return _pipelined_per_node(client, commands)
        except AskError:  # MOVED or ASK: the slot map changed
            client.nodes_manager.initialize()
            return _pipelined_per_node(client, commands)
        except redis.ConnectionError:
            with contextlib.suppress(*_REDIS_ERRORS):
                client.nodes_manager.initialize()
            raise

    def _latest_headers_on_cluster(self, tenant: str, task_ids: Sequence[str]) -> list[Any]:
        """``[version, header]`` of each task's latest (None where it has none), as the script gives them.

        Scripts are not pipelined here (redis-py's cluster pipeline refuses them, and a node may lack one), so:
        the pointers in one pipelined round trip, then the headers they name in another. A version pruned between
        the two (a newer one was written) is read again with the script, pointer and header together, so a
        listing never loses a task that has versions.
        """
        keys = [self._task_keys(tenant, task_id) for task_id in task_ids]
        versions = self._pipelined([("get", latest) for _, latest, _, _ in keys])
        heads = [("hget", head_key, v) for (_, _, head_key, _), v in zip(keys, versions, strict=True) if v is not None]
        headers = iter(self._pipelined(heads))
        out: list[Any] = []
        for (_, latest, head_key, _), version in zip(keys, versions, strict=True):
            header = next(headers) if version is not None else None
            if version is not None and header is None:
                out.append(self._get_latest_script(keys=[latest, head_key], args=[""]))
            else:
                out.append(None if version is None else [version, header])
        return out

    def open_blob(self, tenant: str, task_id: str, version: int, first_bytes: int) -> BlobReader:
        key = f"{self._version_prefix(tenant, task_id)}{version}"
        legacy_key = self._task_keys(tenant, task_id)[3]

        def open_() -> tuple[int, bytes, bytes | None]:
            size, first, legacy = self._pipelined(
                [
                    ("strlen", key),
                    ("getrange", key, 0, first_bytes - 1),
                    ("hget", legacy_key, str(version)),  # nil unless stored before blobs were strings
                ]
            )
            return int(size), bytes(first), legacy

        size, first, legacy = self.call("reading a prefix", open_)
        if size:
            return _RangeReader(self, key, size, first, f"prefix {task_id!r} version {version}")
        if legacy is None:  # no stored blob is empty: absent
            raise PrefixNotFound(f"prefix {task_id!r} not found (version {version})")
        return WholeBlobReader(bytes(legacy), first_bytes)

    def list_tasks(self, tenant: str) -> list[str]:
        index = self._index_key(tenant)

        def scan() -> list[str]:
            # SSCAN, not SMEMBERS or KEYS: bounded work per call on a big tenant.
            names = sorted(m.decode() for m in self._client.sscan_iter(index, count=1000))
            # Entries of deleted tasks or interrupted puts have no latest pointer.
            present = self._pipelined([("exists", f"{self._tag(tenant, name)}:latest") for name in names])
            return [n for n, there in zip(names, present, strict=True) if there]

        return self.call("listing tasks", scan)

    # -- invalidation ---------------------------------------------------------

    def subscribe(self, callback: Callable[[Invalidation], None]) -> None:
        """Call `callback` from a daemon thread for every put/delete on this Redis (any replica).

        After each (re)subscription it is called with `Invalidation(None, None, None)`:
        messages may have been missed while disconnected, so anything derived from the
        store's state should be dropped. A bound method is held weakly, so a registry
        that is dropped stops being called instead of being kept alive by the backend.
        """
        ref: Callable[[], Callable[[Invalidation], None] | None] = (
            weakref.WeakMethod(callback) if inspect.ismethod(callback) else lambda: callback
        )
        with self._sub_lock:
            self._callbacks.append(ref)
            if self._subscriber is None and not self._closed.is_set():
                self._subscriber = threading.Thread(target=self._listen, name="prefix-store-redis-sub", daemon=True)
                self._subscriber.start()

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until the subscriber is listening (for tests and startup checks)."""
        return self._subscribed.wait(timeout)

    def _dispatch(self, event: Invalidation) -> None:
        with self._sub_lock:
            self._callbacks = [ref for ref in self._callbacks if ref() is not None]
            callbacks = [cb for ref in self._callbacks if (cb := ref()) is not None]
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                logger.exception("prefix invalidation callback failed for %s", event)

    def _listen(self) -> None:
        backoff = _BACKOFF_FIRST
        failing = False
        attempt = 0
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = self._pubsub(attempt)
                attempt += 1
                pubsub.subscribe(self.channel)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=0.1)  # also how quickly close() is noticed
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Also seen when redis-py reconnects and resubscribes by itself.
                        self._subscribed.set()
                        if failing:
                            logger.info("redis store subscriber reconnected to %s", self._safe_url)
                        failing, backoff = False, _BACKOFF_FIRST
                        self._dispatch(Invalidation(None, None, None))
                    elif message["type"] == "message":
                        event = _parse_message(message["data"])
                        if event is not None:
                            self._dispatch(event)
            except (*_REDIS_ERRORS, OSError) as e:
                self._subscribed.clear()
                if not failing:
                    logger.warning(
                        "redis store subscriber lost %s: %s; reconnecting", self._safe_url, self._scrub(str(e))
                    )
                failing = True
                self._closed.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_CAP)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*_REDIS_ERRORS, OSError):
                        pubsub.close()

    def _pubsub(self, attempt: int) -> Any:
        """A pub/sub connection. On a cluster, a PUBLISH reaches every node's subscribers, so each attempt takes
        the next node, and one node down does not leave the subscriber waiting for it to come back."""
        client = self._client
        if not self.cluster:
            return client.pubsub()
        nodes = sorted(client.get_nodes(), key=lambda node: node.name)  # type: ignore[union-attr]
        return client.pubsub(node=nodes[attempt % len(nodes)])

    def close(self) -> None:
        self._closed.set()
        subscriber = self._subscriber
        if subscriber is not None:
            subscriber.join(timeout=2.0)
        with self._connect_lock:  # a cluster's client may never have been built: nothing to close then
            if self._connected is not None:
                self._connected.close()


class _RangeReader(BlobReader):
    """Ranges of one version's blob, by GETRANGE (all of one read in one pipeline)."""

    def __init__(self, backend: RedisBackend, key: str, size: int, first: bytes, what: str) -> None:
        self._backend, self._key, self._what = backend, key, what
        self.size, self.first = size, first

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        def fetch() -> list[bytes]:
            parts = self._backend._pipelined([("getrange", self._key, start, end - 1) for start, end in ranges])
            return [bytes(part) for part in parts]

        parts = self._backend.call("reading a prefix", fetch)
        for (start, end), part in zip(ranges, parts, strict=True):
            # A version never changes, so a short piece means it was deleted (or pruned) since we opened it.
            if len(part) != end - start:
                raise PrefixNotFound(f"{self._what} was deleted while it was being read")
        return parts


def _pipelined_per_node(client: redis.RedisCluster, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """`commands` (``(name, key, *args)``) in one plain pipeline per node that holds their keys, results in order."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, (_, key, *_) in enumerate(commands):
        node = client.get_node_from_key(key)
        groups.setdefault(node.name, (node, []))[1].append(i)
    results: list[Any] = [None] * len(commands)
    for node, indexes in groups.values():
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        for i in indexes:
            name, *args = commands[i]
            getattr(pipe, name)(*args)
        for i, result in zip(indexes, pipe.execute(), strict=True):
            results[i] = result
    return results


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether the one Redis `client` talks to is a Cluster node (INFO's cluster section says so)."""
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:  # an ACL user may not run INFO: not a reason to refuse the store
        return False


def _evicting_policy(client: redis.Redis | redis.RedisCluster) -> str | None:
    """The store's maxmemory-policy if it may evict our keys (allkeys-*: every key is a candidate; volatile-*
    touches only keys with a TTL, of which ours have one, the tenant lock), else None; None too when INFO is not
    allowed."""
    try:
        info = client.info("memory")
    except redis.ResponseError:
        return None
    # A cluster client answers per node: {node name: its INFO}.
    sections = [info] if "maxmemory_policy" in info else [v for v in info.values() if isinstance(v, dict)]
    for section in sections:
        policy = str(section.get("maxmemory_policy", ""))
        if policy.startswith("allkeys-"):
            return policy
    return None


def _parse_message(data: bytes | str) -> Invalidation | None:
    try:
        d = json.loads(data)
        version = d["version"]
        if not isinstance(d["tenant"], str) or not isinstance(d["task_id"], str):
            raise TypeError("tenant and task_id must be strings")
        if version is not None and not isinstance(version, int):
            raise TypeError("version must be an integer or null")
        return Invalidation(d["tenant"], d["task_id"], version)
    except (ValueError, TypeError, KeyError) as e:
        logger.warning("ignoring malformed prefix invalidation %r: %s", data, e)
        return None
