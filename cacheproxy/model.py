"""Frozen values shared by every layer: headers, request and response heads, entries.

Rules of this module:
- It imports only the standard library, so the pure policy can use it.
- Header names and values are raw ``bytes``; a header list is a tuple of
  ``(name, value)`` pairs in the order received, repeats kept.
- Names compare case-insensitively (RFC 9110 section 5.1); values are never decoded.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback, RFC 1918, link-local and unique-local: a LAN, never the internet.
DEFAULT_ALLOW: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
    )
)

Headers = tuple[tuple[bytes, bytes], ...]


def header_values(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of field ``name``, in order (RFC 9110 section 5.3)."""
    lname = name.lower()
    return [v for n, v in headers if n.lower() == lname]


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The field's values joined by ``, `` (RFC 9110 section 5.3), or None if absent."""
    values = header_values(headers, name)
    if not values:
        return None
    return b", ".join(values)


def header_list(headers: Headers, name: bytes) -> list[bytes]:
    """The comma-separated members of a list-based field, stripped, empties dropped.

    RFC 9110 section 5.6.1.  Quoted commas are respected.
    """
    items: list[bytes] = []
    for value in header_values(headers, name):
        items.extend(split_list(value))
    return items


def split_list(value: bytes) -> list[bytes]:
    """Split one list-based field value on commas outside quoted strings."""
    if b'"' not in value:
        return [item for item in (part.strip() for part in value.split(b",")) if item]
    items: list[bytes] = []
    current = bytearray()
    quoted = False
    escaped = False
    for byte in value:
        char = bytes((byte,))
        if escaped:
            escaped = False
        elif quoted and char == b"\\":
            escaped = True
        elif char == b'"':
            quoted = not quoted
        elif char == b"," and not quoted:
            item = bytes(current).strip()
            if item:
                items.append(item)
            current.clear()
            continue
        current += char
    item = bytes(current).strip()
    if item:
        items.append(item)
    return items


def without_headers(headers: Headers, names: frozenset[bytes]) -> Headers:
    """``headers`` less every field whose lower-cased name is in ``names``."""
    return tuple((n, v) for n, v in headers if n.lower() not in names)


def with_header(headers: Headers, name: bytes, value: bytes) -> Headers:
    """``headers`` with field ``name`` replaced by the single ``value``."""
    return without_headers(headers, frozenset({name.lower()})) + ((name, value),)


@dataclass(frozen=True)
class RequestHead:
    """A request as the client sent it.

    @ivar method: the method token, e.g. ``b"GET"``.
    @ivar target: the request target exactly as received (absolute form for proxying).
    @ivar version: ``b"1.1"`` or ``b"1.0"``.
    @ivar headers: the header fields as received.
    """

    method: bytes
    target: bytes
    version: bytes = b"1.1"
    headers: Headers = ()


@dataclass(frozen=True)
class ResponseHead:
    """A response's status line and header fields (no body).

    @ivar status: the status code.
    @ivar reason: the reason phrase.
    @ivar headers: end-to-end header fields in order, repeats kept.
    """

    status: int
    reason: bytes = b""
    headers: Headers = ()


@dataclass(frozen=True)
class Entry:
    """One stored response: its head, how it was obtained, and its body's size.

    @ivar key: the cache key of the URL (see L{cacheproxy.policy.cache_key}).
    @ivar url: the absolute URL the response was fetched for.
    @ivar response: the stored response head (hop-by-hop fields removed).
    @ivar request_time: clock when the request that produced it was sent
        (RFC 9111 section 4.2.3 ``request_time``).
    @ivar response_time: clock when the response was received (``response_time``).
    @ivar vary: the request's values of the response's ``Vary`` fields,
        as ``(lower-cased name, normalised value or None)`` pairs; empty without Vary.
    @ivar body_length: the stored body's length in bytes.
    @ivar body_id: the store's name for the body; opaque to everyone but the store.
    @ivar recorded: stored only because of ``--record`` (or imported from a HAR
        file): replayed by ``--offline``, served online only where RFC 9111 allows.
    @ivar local_lifetime: freshness in seconds that the cache's own rules
        (``--refresh-pattern``) give a response without explicit freshness, or None.
        Worked out from the current rules at every lookup; never stored.
    @ivar local_immutable: those rules call the response immutable (never stored).
    """

    key: str
    url: str
    response: ResponseHead
    request_time: float
    response_time: float
    vary: tuple[tuple[bytes, bytes | None], ...] = ()
    body_length: int = 0
    body_id: str = ""
    recorded: bool = False
    local_lifetime: float | None = None
    local_immutable: bool = False


@dataclass(frozen=True)
class RefreshRule:
    """One refresh pattern.

    @ivar pattern: searched in the normalised absolute URL.
    @ivar minimum: lower bound of the lifetime, in seconds.
    @ivar percent: the lifetime as a percent of the Last-Modified age.
    @ivar maximum: upper bound of the lifetime, in seconds.
    @ivar immutable: the URL names content that never changes once published.
    @ivar source: the rule as written, for C{--help} and the status page.
    """

    pattern: re.Pattern[str]
    minimum: float
    percent: float
    maximum: float
    immutable: bool = False
    source: str = ""


@dataclass(frozen=True)
class Config:
    """Everything the command line decides, after validation.

    @ivar port: a Twisted server endpoint string.
    @ivar cache_dir: the diskcache directory.
    @ivar cache_size: the store's disk budget in bytes.
    @ivar max_object_size: responses larger than this many bytes are not stored.
    @ivar access_log: a file path, or ``"-"`` for standard output.
    @ivar origin_timeout: seconds allowed for connecting to an origin and receiving
        the first byte of its response.
    @ivar heuristic_cap: upper bound in seconds of heuristic freshness.
    @ivar allow: client networks that may use the proxy.
    @ivar connect_ports: ports a CONNECT tunnel may reach.
    @ivar tunnel_idle_timeout: seconds a tunnel may carry nothing before it is closed.
    @ivar upstream: a parent proxy's host and port, or None to go direct.
    @ivar log_format: ``"squid"`` or ``"combined"``.
    @ivar offline: never contact an origin; replay what is stored.
    @ivar record: also store complete responses RFC 9111 would not, for replay.
    @ivar header_timeout: seconds a client may take to send a request head, or
        may leave a request body without progress.
    @ivar idle_timeout: seconds a keep-alive connection may wait for a request.
    @ivar max_connections: open client connections; past it new ones get 503.
    @ivar memory_cache: bytes of RAM for hot small responses (0 turns it off).
    @ivar workers: processes sharing the listening socket and the store.
    @ivar refresh_rules: heuristic freshness by URL, first match wins
        (``--refresh-pattern`` rules, then the built-in ones).
    @ivar intercept: host patterns whose CONNECTs are intercepted (TLS terminated
        with a certificate from the local CA) and cached; empty: none are.
    @ivar ca_dir: the local CA's directory (``cacheproxy ca init``).
    @ivar upstream_ca: a PEM file of the only CAs trusted for https origins, or
        None for the system trust store.
    """

    port: str = "tcp:3128"
    cache_dir: str = "var/cache"
    cache_size: int = 1 << 30
    max_object_size: int = 256 << 20
    access_log: str = "var/log/access.log"
    origin_timeout: float = 60.0
    heuristic_cap: float = 86400.0
    allow: tuple[Network, ...] = DEFAULT_ALLOW
    connect_ports: frozenset[int] = frozenset({443})
    tunnel_idle_timeout: float = 600.0
    upstream: tuple[str, int] | None = None
    log_format: str = "squid"
    refresh_rules: tuple[RefreshRule, ...] = ()
    offline: bool = False
    record: bool = False
    header_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 2000
    memory_cache: int = 64 << 20
    workers: int = 1
    intercept: tuple[str, ...] = ()
    ca_dir: str = "var/ca"
    upstream_ca: str | None = None


def is_loopback(client: str) -> bool:
    """Whether the client address is the proxy's own host (127/8, ::1)."""
    return is_allowed(client, (DEFAULT_ALLOW[0], DEFAULT_ALLOW[1]))


def is_allowed(client: str, networks: tuple[Network, ...]) -> bool:
    """Whether the client address lies in one of ``networks``."""
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        # Not an IP address (a UNIX socket): local by construction.
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
