"""Redis store URLs: the cluster schemes, passwords kept out of messages, and options checked before use.

redis-py reads a URL's query parameters (``?ssl_ca_certs=/ca.pem&socket_timeout=2``) into the keyword arguments
of each connection it makes, and only makes one on the first command. A misspelt option, a TLS option on a plain
``redis://`` URL, or a certificate file that is not there would fail every command, long after startup, and a
misspelt option as a TypeError (a 500). ``check_options`` finds these when the store is opened.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis
from redis.connection import parse_url

# Store URL schemes of a Redis Cluster, and the redis-py scheme each becomes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Query parameters that name a file (or, ssl_ca_path, a directory) the TLS handshake reads.
_TLS_PATH_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")


def redact_url(url: str) -> str:
    """`url` with any password (``user:password@`` or a ``password=`` query parameter) replaced by ***, for logs
    and error messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")  # hosts as written: a cluster URL may name several
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = "&".join(
        "password=***" if piece.partition("=")[0].lower() == "password" else piece for piece in parts.query.split("&")
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide (rebuilt, "disk:///abs" would lose its empty host: "disk:/abs")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_and_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port" (6379 when no port is given)."""
    host, colon, port = address.rpartition(":")
    if not colon or "]" in port:
        host, port = address, "6379"
    if not port.isdigit():
        raise ValueError(f"bad port in {address!r}")
    return host.strip("[]"), int(port)


def url_passwords(url: str) -> list[str]:
    """The passwords `url` carries, as redis-py reads them (percent-decoded), to scrub from messages."""
    parts = urlsplit(url)
    found = [parts.password, unquote(parts.password)] if parts.password else []
    found += [value for name, value in parse_qsl(parts.query) if name.lower() == "password" and value]
    return found


def check_options(client_url: str) -> None:
    """ValueError saying what is wrong if redis-py could not connect with `client_url`'s options whatever the
    server did: an option it does not know, a TLS option on a ``redis://`` URL, a value it refuses, or a TLS file
    that does not exist. `client_url` is a redis:// or rediss:// URL of one host (a cluster's seed)."""
    kwargs = parse_url(client_url)
    tls = "connection_class" in kwargs  # rediss://: redis-py's SSLConnection
    connection_class = kwargs.pop("connection_class", redis.Connection)
    for name in _TLS_PATH_OPTIONS:
        if (path := kwargs.get(name)) and tls and not Path(path).exists():
            raise ValueError(f"{name}={path}: no such file or directory")
    try:
        connection_class(**kwargs)  # opens no socket: it only takes the options
    except TypeError as e:
        unknown = re.search(r"argument '(\w+)'", str(e))
        name = unknown.group(1) if unknown else str(e)
        if name.startswith("ssl_") and not tls:
            raise ValueError(f"{name} is a TLS option: the URL's scheme must be rediss") from None
        raise ValueError(f"unknown option {name!r}") from None
    except (redis.RedisError, ValueError) as e:
        raise ValueError(str(e)) from None


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the errors it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def untrusted_certificate(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed beneath `error`, if one did: the server's certificate is not signed by
    a CA we were told to trust, has expired, or names another host. No retry will fix it."""
    return next((e for e in _chain(error) if isinstance(e, ssl.SSLCertVerificationError)), None)


def connection_hint(error: BaseException, tls: bool) -> str:
    """A likely cause of `error` that its own message does not say, in parentheses; "" when there is no sign."""
    causes = list(_chain(error))
    if tls and any(isinstance(e, ssl.SSLError) or "handshake" in str(e) for e in causes):
        return (
            " (the TLS handshake failed: a server that does not speak TLS, or one that requires a client"
            " certificate, ?ssl_certfile=PATH&ssl_keyfile=PATH, fails like this)"
        )
    if not tls and any(isinstance(e, ConnectionResetError) for e in causes):
        return " (a server that speaks only TLS resets plain connections like this: use rediss://)"
    return ""
