"""The command line: sizes, ports, and the Config they make (INTERFACE.md)."""

from __future__ import annotations

import pytest
from twisted.python import usage

from cacheproxy.options import Options, parse_port, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("64K", 64 << 10),
        ("500M", 500 << 20),
        ("2G", 2 << 30),
        ("1g", 1 << 30),
        ("1.5M", 3 << 19),
        ("256MB", 256 << 20),
    ],
)
def test_sizes_take_binary_suffixes(text: str, size: int):
    """A size is a number with an optional K, M or G suffix."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-1M", "10X", "M"])
def test_bad_sizes_are_usage_errors(text: str):
    """A size that is not a number with a known suffix is a usage error."""
    with pytest.raises(usage.UsageError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("3128", "tcp:3128"),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"),
    ],
)
def test_port_is_a_number_or_an_endpoint(text: str, endpoint: str):
    """-p takes a port number or a Twisted endpoint string."""
    assert parse_port(text) == endpoint


@pytest.mark.parametrize("text", ["70000", "http", "-5"])
def test_bad_ports_are_usage_errors(text: str):
    """A port that is neither is a usage error."""
    with pytest.raises(usage.UsageError):
        parse_port(text)


def test_defaults_follow_the_interface():
    """Without options the proxy listens on 3128 with its cache in var/cache."""
    options = Options()
    options.parseOptions([])
    config = options["config"]
    assert config.port == "tcp:3128"
    assert config.cache_dir == "var/cache"
    assert config.cache_size == 1 << 30
    assert config.max_object_size == 256 << 20
    assert config.access_log == "var/log/access.log"
    assert config.origin_timeout == 60


def test_every_option_reaches_the_config():
    """Each option given on the command line lands in the Config."""
    options = Options()
    options.parseOptions(
        [
            "-p",
            "8080",
            "--cache-dir",
            "/tmp/c",
            "--cache-size",
            "2G",
            "--max-object-size",
            "10M",
            "--access-log",
            "-",
            "--origin-timeout",
            "5",
        ]
    )
    config = options["config"]
    assert config.port == "tcp:8080"
    assert config.cache_dir == "/tmp/c"
    assert config.cache_size == 2 << 30
    assert config.max_object_size == 10 << 20
    assert config.access_log == "-"
    assert config.origin_timeout == 5
