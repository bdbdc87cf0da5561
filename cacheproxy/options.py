"""The command line of ``twistd cacheproxy``: options in, one immutable Config out."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Any

from twisted.python import usage

from cacheproxy.ca import CAError, load_ca
from cacheproxy.intercept import check_pattern, origin_tls_policy
from cacheproxy.model import DEFAULT_ALLOW, Config, Network
from cacheproxy.refresh import builtin_rules, parse_refresh_pattern

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count from ``1024``, ``64K``, ``500M``, ``2G`` (binary multiples)."""
    match = _SIZE.match(text)
    if match is None:
        raise usage.UsageError(f"not a size: {text!r} (use a number with K, M or G)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def parse_port(text: str) -> str:
    """A Twisted server endpoint string from a port number or an endpoint string."""
    text = text.strip()
    if text.isdigit():
        if not 0 <= int(text) <= 65535:
            raise usage.UsageError(f"port out of range: {text}")
        return f"tcp:{text}"
    if ":" not in text:
        raise usage.UsageError(
            f"not a port: {text!r} (use a number or an endpoint like tcp:3128)"
        )
    return text


def parse_network(text: str) -> Network:
    """An IPv4 or IPv6 network in CIDR notation (a bare address is one host)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise usage.UsageError(
            f"not a network: {text!r} (use CIDR, 10.0.0.0/8)"
        ) from None


def parse_ports(text: str) -> frozenset[int]:
    """A comma-separated list of TCP ports."""
    ports: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 0 < int(item) <= 65535:
            raise usage.UsageError(f"not a port list: {text!r} (use 443,8443)")
        ports.add(int(item))
    return frozenset(ports)


def parse_upstream(text: str) -> tuple[str, int]:
    """A parent proxy from ``http://host:port`` (or ``host:port``)."""
    from urllib.parse import urlsplit

    url = urlsplit(text if "://" in text else f"http://{text}")
    try:
        port = url.port
    except ValueError:
        port = -1
    if (
        url.scheme != "http"
        or not url.hostname
        or port == -1
        or url.path not in ("", "/")
    ):
        raise usage.UsageError(
            f"not a parent proxy URL: {text!r} (use http://host:port)"
        )
    return url.hostname, port or 80


def parse_log_format(text: str) -> str:
    """``squid`` or ``combined``."""
    if text not in ("squid", "combined"):
        raise usage.UsageError(f"unknown log format: {text!r} (squid or combined)")
    return text


def parse_count(text: str) -> int:
    """A positive whole number."""
    if not text.strip().isdigit() or int(text) < 1:
        raise usage.UsageError(f"not a positive whole number: {text!r}")
    return int(text)


def parse_seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise usage.UsageError(f"must be positive: {text!r}")
    return value


class Options(usage.Options):
    """Options of ``twistd cacheproxy``; INTERFACE.md is their contract."""

    synopsis = "[options]"

    longdesc = (
        "A caching HTTP forward proxy. Point clients at it as their HTTP proxy "
        "(http_proxy=http://host:3128/); it answers from its disk store when "
        "RFC 9111 allows and fetches from the origin otherwise."
    )

    def parseOptions(self, options: Any = None) -> None:
        """Parse, keeping the arguments as given for worker processes to re-parse."""
        self.raw: list[str] = list(options) if options is not None else sys.argv[1:]
        super().parseOptions(options)

    def getUsage(self, width: int | None = None) -> str:
        """The usual help, then the built-in refresh rules, one a line."""
        rules = "\n".join(f"  {rule.source}" for rule in builtin_rules())
        return (
            super().getUsage(width)
            + "\nBuilt-in refresh patterns (checked after any --refresh-pattern):\n"
            + rules
            + "\n"
        )

    optFlags = [
        [
            "offline",
            None,
            "never contact an origin: serve what is stored, fresh or not; a miss "
            "is 504",
        ],
        [
            "record",
            None,
            "store every complete 200 response to GET, even ones the origin marks "
            "uncacheable, so that --offline can replay them",
        ],
    ]

    optParameters = [
        [
            "port",
            "p",
            "tcp:3128",
            "where to listen: a port number or a Twisted endpoint string "
            "(tcp:3128:interface=127.0.0.1)",
        ],
        ["cache-dir", None, "var/cache", "the cache directory (created if missing)"],
        [
            "cache-size",
            None,
            "1G",
            "disk budget of the store (500M, 2G); least recently used entries "
            "are evicted past it",
        ],
        [
            "max-object-size",
            None,
            "256M",
            "responses larger than this are relayed but not stored",
        ],
        [
            "access-log",
            None,
            "var/log/access.log",
            "one line per request in Squid's format ('-' for standard output)",
        ],
        [
            "origin-timeout",
            None,
            "60",
            "seconds to connect to an origin and receive the first byte of its "
            "response before answering 504, and that a response body may then "
            "send nothing before it is cut off",
        ],
        [
            "connect-ports",
            None,
            "443",
            "comma-separated ports that CONNECT tunnels may reach (443,8443)",
        ],
        [
            "upstream",
            None,
            None,
            "send all origin traffic, CONNECT included, through this parent proxy "
            "(http://host:port)",
        ],
        ["log-format", None, "squid", "access log format: squid or combined"],
        [
            "workers",
            None,
            "1",
            "processes sharing one listening socket and one store (a parent "
            "process starts them and restarts any that dies)",
        ],
        [
            "memory-cache",
            None,
            "64M",
            "RAM for hot small responses, served without touching the disk "
            "(0 turns it off)",
        ],
        [
            "max-connections",
            None,
            "2000",
            "open client connections; past it new ones get 503",
        ],
        [
            "header-timeout",
            None,
            "30",
            "seconds a client may take to send a request head, or leave a request "
            "body without progress, before it is cut off",
        ],
        [
            "idle-timeout",
            None,
            "60",
            "seconds an idle keep-alive client connection stays open",
        ],
        [
            "ca-dir",
            None,
            "var/ca",
            "the local CA that --intercept signs host certificates with "
            "(made by 'cacheproxy ca init')",
        ],
        [
            "upstream-ca",
            None,
            None,
            "PEM file of the only CAs trusted for intercepted https origins "
            "(default: the system trust store)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow"] = []
        self["refresh-pattern"] = []
        self["intercept"] = []

    def opt_refresh_pattern(self, rule: str) -> None:
        try:
            self["refresh-pattern"].append(parse_refresh_pattern(rule))
        except ValueError as reason:
            raise usage.UsageError(str(reason)) from None

    opt_refresh_pattern.__doc__ = (
        "'REGEX MIN PCT MAX [immutable]': heuristic freshness for responses without "
        "explicit freshness whose URL matches REGEX (MIN and MAX in minutes, PCT of "
        "the Last-Modified age; immutable: a client's no-cache or max-age=0 does not "
        "force a refetch). Repeatable; first match wins; checked before the "
        "built-in rules listed below"
    )

    def opt_allow(self, network: str) -> None:
        self["allow"].append(parse_network(network))

    # usage.Options shows an opt_ method's docstring as its help, verbatim.
    opt_allow.__doc__ = (
        "client network that may use the proxy, in CIDR, IPv4 or IPv6 (repeatable; "
        "default: loopback, 10/8, 172.16/12, 192.168/16, 169.254/16, fc00::/7, "
        "fe80::/10)"
    )

    def opt_intercept(self, pattern: str) -> None:
        try:
            self["intercept"].append(check_pattern(pattern))
        except ValueError as reason:
            raise usage.UsageError(f"--intercept: {reason}") from None

    opt_intercept.__doc__ = (
        "HOST_PATTERN: terminate TLS of CONNECTs to matching hosts with a "
        "certificate from the local CA, and cache what passes inside as https:// "
        "URLs ('pypi.org', '*.pythonhosted.org' for subdomains, '*' for all; "
        "repeatable). Other hosts are tunnelled untouched. See docs/https.md"
    )

    def postOptions(self) -> None:
        """Validate every value into a Config, or raise a UsageError naming it."""
        if self["offline"] and self["record"]:
            raise usage.UsageError("--record and --offline exclude each other")
        self["config"] = Config(
            port=parse_port(self["port"]),
            cache_dir=self["cache-dir"],
            cache_size=parse_size(self["cache-size"]),
            max_object_size=parse_size(self["max-object-size"]),
            access_log=self["access-log"],
            origin_timeout=parse_seconds(self["origin-timeout"]),
            allow=tuple(self["allow"]) or DEFAULT_ALLOW,
            connect_ports=parse_ports(self["connect-ports"]),
            upstream=parse_upstream(self["upstream"]) if self["upstream"] else None,
            log_format=parse_log_format(self["log-format"]),
            refresh_rules=tuple(self["refresh-pattern"]) + builtin_rules(),
            offline=bool(self["offline"]),
            record=bool(self["record"]),
            header_timeout=parse_seconds(self["header-timeout"]),
            idle_timeout=parse_seconds(self["idle-timeout"]),
            max_connections=parse_count(self["max-connections"]),
            memory_cache=parse_size(self["memory-cache"]),
            workers=parse_count(self["workers"]),
            intercept=tuple(self["intercept"]),
            ca_dir=self["ca-dir"],
            upstream_ca=self["upstream-ca"],
        )
        _check_tls(self["config"])


def _check_tls(config: Config) -> None:
    """Refuse to start interception without a usable CA or upstream CA file."""
    if config.upstream_ca is not None:
        try:
            origin_tls_policy(Path(config.upstream_ca))
        except ValueError as reason:
            raise usage.UsageError(f"--upstream-ca: {reason}") from None
    if config.intercept:
        try:
            load_ca(Path(config.ca_dir))
        except CAError as reason:
            raise usage.UsageError(f"--intercept: {reason}") from None
