"""End to end: running for a LAN: parent proxies, PURGE, log formats and rotation,
graceful shutdown (issue 4)."""

from __future__ import annotations

import os
import re
import signal

import pytest_twisted
from twisted.internet import defer, reactor, task

from cacheproxy import cli
from tests.conftest import RunningProxy, start_proxy
from tests.support import Origin, fetch, send_raw, start_raw_origin, wait_for
from tests.test_e2e_access import ESTABLISHED, _echo_server, _open_tunnel


@pytest_twisted.ensureDeferred
async def test_two_chained_proxies(origin: Origin, tmp_path):
    """A child proxy with --upstream sends its misses through the parent; both cache."""
    url = origin.static("/chain", b"chained", {"Cache-Control": "max-age=60"})
    parent = await start_proxy(tmp_path / "parent")
    child = await start_proxy(tmp_path / "child", upstream=("127.0.0.1", parent.port))
    try:
        first = await fetch(child.port, "GET", url)
        second = await fetch(child.port, "GET", url)
        via_parent = await fetch(parent.port, "GET", url)
        await wait_for(lambda: "FIRSTUP_PARENT" in _text(child.access_log), timeout=3)
    finally:
        await child.service.stopService()
        await parent.service.stopService()
    assert first.body == second.body == via_parent.body == b"chained"
    # Both proxies stored it: the parent on the way, the child at its end.
    assert first.headers_named("Cache-Status") == [
        "cacheproxy; fwd=miss; stored",
        "cacheproxy; fwd=miss; stored",
    ]
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert via_parent.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/chain") == 1
    vias = origin.requests[b"/chain"][0].header("Via")
    assert len(re.findall(r"1\.1 cacheproxy-[0-9a-f]+", vias)) == 2
    assert "FIRSTUP_PARENT/127.0.0.1" in _text(child.access_log)


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


@pytest_twisted.ensureDeferred
async def test_connect_through_a_parent(tmp_path):
    """A CONNECT to the child is chained through the parent's CONNECT."""
    echo, _ = _echo_server()
    port = echo.getHost().port
    ports = frozenset({port})
    parent = await start_proxy(tmp_path / "parent", connect_ports=ports)
    child = await start_proxy(
        tmp_path / "child", connect_ports=ports, upstream=("127.0.0.1", parent.port)
    )
    try:
        client = await _open_tunnel(child.port, port, b"through two")
        await client.expect(len(ESTABLISHED) + 11)
        client.transport.loseConnection()
        await client.gone
        await wait_for(lambda: "TCP_TUNNEL" in _text(parent.access_log), timeout=3)
    finally:
        await child.service.stopService()
        await parent.service.stopService()
        await echo.stopListening()
    assert client.data == ESTABLISHED + b"through two"


@pytest_twisted.ensureDeferred
async def test_parent_loop_is_508(origin: Origin, tmp_path):
    """A request coming back to a proxy in a chain is stopped there: 508."""
    url = origin.static("/self", b"x")
    first = await start_proxy(tmp_path / "a")
    second = await start_proxy(tmp_path / "b", upstream=("127.0.0.1", first.port))
    try:
        # The request already passed the second proxy once (its Via says so), as
        # it would have if the first proxy had the second as its parent.
        response = await fetch(
            second.port, "GET", url, {"Via": "1.1 " + second.service.proxy.pseudonym}
        )
    finally:
        await second.service.stopService()
        await first.service.stopService()
    assert response.status == 508
    assert origin.count("/self") == 0


@pytest_twisted.ensureDeferred
async def test_purge_from_loopback(origin: Origin, proxy: RunningProxy):
    """PURGE from loopback drops a stored URL: 200, then 404 when nothing is left."""
    url = origin.static("/p", b"p", {"Cache-Control": "max-age=300"})
    await fetch(proxy.port, "GET", url)
    purged = await fetch(proxy.port, "PURGE", url)
    again = await fetch(proxy.port, "PURGE", url)
    after = await fetch(proxy.port, "GET", url)
    assert (purged.status, again.status) == (200, 404)
    assert after.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert origin.count("/p") == 2


@pytest_twisted.ensureDeferred
async def test_combined_log_format(origin: Origin, tmp_path):
    """--log-format combined writes Apache combined lines."""
    url = origin.static("/c", b"c")
    running = await start_proxy(tmp_path, log_format="combined")
    try:
        await fetch(running.port, "GET", url, {"User-Agent": "tester/1.0"})
        await wait_for(lambda: _text(running.access_log) != "", timeout=3)
    finally:
        await running.service.stopService()
    line = _text(running.access_log).splitlines()[0]
    pattern = (
        r"^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "
        r'"GET (\S+) HTTP/1\.1" 200 \d+ "-" "tester/1\.0"$'
    )
    match = re.match(pattern, line)
    assert match, line
    assert match.group(1) == url


@pytest_twisted.ensureDeferred
async def test_sigusr1_reopens_the_access_log(origin: Origin, proxy: RunningProxy):
    """After logrotate moves the log, SIGUSR1 makes the proxy write a new file."""
    url = origin.static("/r", b"r")
    await fetch(proxy.port, "GET", url)
    await wait_for(lambda: _text(proxy.access_log) != "", timeout=3)
    rotated = proxy.access_log.with_name("access.log.1")
    os.rename(proxy.access_log, rotated)
    os.kill(os.getpid(), signal.SIGUSR1)
    await fetch(proxy.port, "GET", url + "?after")
    await wait_for(lambda: "?after" in _text(proxy.access_log), timeout=3)
    assert "?after" not in rotated.read_text()


@pytest_twisted.ensureDeferred
async def test_shutdown_lets_requests_in_flight_finish(tmp_path):
    """Stopping the proxy waits for a response in flight, then closes."""
    held = []
    raw = start_raw_origin(lambda transport, head: held.append(transport))
    running = await start_proxy(tmp_path)
    try:
        pending = defer.ensureDeferred(fetch(running.port, "GET", raw.url("/slow")))
        await wait_for(lambda: len(held) == 1)
        stopping = defer.ensureDeferred(running.service.stopService())
        refused = await _connection_refused(running.port)
        assert refused
        assert not stopping.called
        held[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        response = await pending
        await stopping
    finally:
        await raw.stop()
    assert response.body == b"done"


async def _connection_refused(port: int) -> bool:
    """Whether a new connection to ``port`` is refused (the port is closed)."""
    try:
        await send_raw(port, b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n")
    except Exception:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_cacheproxy_stats_reads_what_the_proxy_counted(
    origin: Origin, tmp_path, capsys
):
    """`cacheproxy stats` reports the hits and misses the proxy wrote to the store."""
    url = origin.static("/counted", b"c", {"Cache-Control": "max-age=60"})
    running = await start_proxy(tmp_path)
    try:
        await fetch(running.port, "GET", url)
        await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert cli.main(["stats", "--cache-dir", str(running.cache_dir)]) == 0
    assert "hits/misses: 1/1" in capsys.readouterr().out


@pytest_twisted.ensureDeferred
async def test_command_works_beside_a_running_proxy(origin: Origin, tmp_path, capsys):
    """`cacheproxy ls` and `purge` work on the cache dir of a running proxy, and the
    proxy sees the purge within about a second (its memory tier's refresh)."""
    url = origin.static("/beside", b"b", {"Cache-Control": "max-age=300"})
    running = await start_proxy(tmp_path)
    try:
        await fetch(running.port, "GET", url)
        cache_dir = str(running.cache_dir)
        assert cli.main(["ls", "--cache-dir", cache_dir]) == 0
        assert url in capsys.readouterr().out
        assert cli.main(["purge", url, "--cache-dir", cache_dir]) == 0
        statuses: list[str] = []

        async def refetched() -> bool:
            response = await fetch(running.port, "GET", url)
            statuses.append(response.header("Cache-Status"))
            return statuses[-1].startswith("cacheproxy; fwd=miss")

        deadline = reactor.seconds() + 5
        while not await refetched():
            assert reactor.seconds() < deadline, statuses
            await task.deferLater(reactor, 0.2, lambda: None)
    finally:
        await running.service.stopService()
    assert origin.count("/beside") == 2
