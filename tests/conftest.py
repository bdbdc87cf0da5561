"""Fixtures: a counting origin and the real proxy, both on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor

from cacheproxy.model import Config
from cacheproxy.refresh import builtin_rules
from cacheproxy.service import ProxyService
from tests.support import Origin, start_origin


@dataclass
class RunningProxy:
    """A proxy under test: its service, bound port and files."""

    service: ProxyService
    port: int
    cache_dir: Path
    access_log: Path


async def start_proxy(tmp_path: Path, **overrides: object) -> RunningProxy:
    """Start a proxy on 127.0.0.1:0 with its cache and log under ``tmp_path``."""
    cache_dir = tmp_path / "cache"
    access_log = tmp_path / "access.log"
    settings: dict[str, object] = {
        "port": "tcp:0:interface=127.0.0.1",
        "cache_dir": str(cache_dir),
        "access_log": str(access_log),
        # As on the command line: the built-in refresh patterns are on by default.
        "refresh_rules": builtin_rules(),
    }
    settings.update(overrides)
    service = ProxyService(Config(**settings), reactor)  # type: ignore[arg-type]
    service.startService()
    port = await service.listening
    return RunningProxy(service, port.getHost().port, cache_dir, access_log)


@pytest_twisted.async_yield_fixture
async def origin() -> AsyncIterator[Origin]:
    """A twisted.web origin counting requests per path."""
    server = start_origin()
    yield server
    await defer.maybeDeferred(server.port.stopListening)


@pytest_twisted.async_yield_fixture
async def proxy(tmp_path: Path) -> AsyncIterator[RunningProxy]:
    """The real proxy with default settings and a fresh cache."""
    running = await start_proxy(tmp_path)
    yield running
    await running.service.stopService()
