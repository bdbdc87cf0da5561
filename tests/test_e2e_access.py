"""End to end: who may use the proxy, forwarding loops, CONNECT tunnels (issue 4)."""

from __future__ import annotations

import ipaddress
import socket

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher

from cacheproxy.tunnel import connect_quietly
from tests.conftest import RunningProxy, start_proxy
from tests.support import TIMEOUT, Origin, fetch, send_raw, wait_for

TEN = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest_twisted.ensureDeferred
async def test_client_outside_allow_gets_403(origin: Origin, tmp_path):
    """A client outside --allow gets 403 and nothing is fetched for it."""
    url = origin.static("/secret", b"s")
    running = await start_proxy(tmp_path, allow=TEN)
    try:
        response = await fetch(running.port, "GET", url)
        connect = await send_raw(
            running.port, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await wait_for(lambda: running.access_log.exists(), timeout=3)
    finally:
        await running.service.stopService()
    assert response.status == 403
    assert response.header("Content-Type").startswith("text/plain")
    assert response.header("Cache-Status") == "cacheproxy; detail=denied"
    assert connect[0].status == 403
    assert origin.count("/secret") == 0
    assert "TCP_DENIED/403" in running.access_log.read_text()


@pytest_twisted.ensureDeferred
async def test_request_that_passed_this_proxy_is_508(
    origin: Origin, proxy: RunningProxy
):
    """A request whose Via already names this proxy is a loop: 508, not forwarded."""
    url = origin.static("/loop", b"l")
    first = await fetch(proxy.port, "GET", url)
    via = first.header("Via")
    looped = await fetch(proxy.port, "GET", url + "?again", {"Via": via})
    assert looped.status == 508
    assert origin.count("/loop") == 1


@pytest_twisted.ensureDeferred
async def test_url_pointing_at_the_proxy_is_508(proxy: RunningProxy):
    """An absolute URL naming the proxy's own address and port is a loop: 508."""
    response = await fetch(proxy.port, "GET", f"http://127.0.0.1:{proxy.port}/x")
    assert response.status == 508


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        self.factory.closed.append(self)


def _echo_server():
    factory = protocol.Factory.forProtocol(_Echo)
    factory.closed = []
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, factory


class _TunnelClient(protocol.Protocol):
    """Collects bytes: ``arrived`` fires at ``want`` bytes, ``gone`` at close."""

    def __init__(self) -> None:
        self.data = b""
        self.want = 0
        self.arrived: defer.Deferred[None] = defer.Deferred()
        self.gone: defer.Deferred[None] = defer.Deferred()

    def expect(self, total: int) -> defer.Deferred[None]:
        self.want, self.arrived = total, defer.Deferred()
        self._check()
        return self.arrived.addTimeout(TIMEOUT, reactor)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def _check(self) -> None:
        if self.want and len(self.data) >= self.want and not self.arrived.called:
            self.arrived.callback(None)

    def connectionLost(self, reason=None) -> None:
        self.gone.callback(None)


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


async def _open_tunnel(proxy_port: int, target_port: int, first: bytes):
    client = _TunnelClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port)
    await connect_quietly(endpoint, client)
    client.transport.write(
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n%s"
        % (target_port, target_port, first)
    )
    return client


@pytest_twisted.ensureDeferred
async def test_connect_tunnel_carries_bytes_both_ways(tmp_path):
    """CONNECT opens a tunnel; bytes sent with the request and after it are echoed."""
    echo, factory = _echo_server()
    port = echo.getHost().port
    running = await start_proxy(tmp_path, connect_ports=frozenset({port}))
    logged: list[str] = []
    observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        client = await _open_tunnel(running.port, port, b"first bytes")
        await client.expect(len(ESTABLISHED) + len(b"first bytes"))
        assert client.data == ESTABLISHED + b"first bytes"
        payload = bytes(range(256)) * 1024
        client.transport.write(payload)
        await client.expect(len(ESTABLISHED) + 11 + len(payload))
        assert client.data[len(ESTABLISHED) + 11 :] == payload
        client.transport.loseConnection()
        await client.gone
        await wait_for(lambda: len(factory.closed) == 1)
        await wait_for(lambda: "TCP_TUNNEL/200" in _log(running), timeout=3)
        globalLogPublisher.removeObserver(observer)
        (metrics,) = await send_raw(
            running.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    finally:
        globalLogPublisher.removeObserver(observer)
        await running.service.stopService()
        await echo.stopListening()
    # A tunnel is one access-log line, not also a pair of "Starting factory" /
    # "Stopping factory" lines in the proxy's own log.
    assert not [line for line in logged if "factory" in line], logged
    line = next(x for x in _log(running).splitlines() if "TCP_TUNNEL" in x)
    assert int(line.split()[4]) == 2 * (11 + len(payload))
    tunnelled = [
        float(row.split()[-1])
        for row in metrics.body.decode().splitlines()
        if row.startswith("cacheproxy_tunnel_bytes_total ")
    ]
    assert tunnelled == [2 * (11 + len(payload))]
    assert f"CONNECT 127.0.0.1:{port}" in line


def _log(running: RunningProxy) -> str:
    return running.access_log.read_text() if running.access_log.exists() else ""


@pytest_twisted.ensureDeferred
async def test_target_closing_closes_the_client(tmp_path):
    """When the target ends the tunnel, the client's connection is closed too."""

    class _Bye(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"bye")
            self.transport.loseConnection()

    factory = protocol.Factory.forProtocol(_Bye)
    target = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port = target.getHost().port
    running = await start_proxy(tmp_path, connect_ports=frozenset({port}))
    try:
        client = await _open_tunnel(running.port, port, b"")
        await client.gone.addTimeout(TIMEOUT, reactor)
    finally:
        await running.service.stopService()
        await target.stopListening()
    assert client.data == ESTABLISHED + b"bye"


@pytest_twisted.ensureDeferred
async def test_connect_to_a_port_not_allowed_is_403(proxy: RunningProxy):
    """CONNECT to a port outside --connect-ports gets 403."""
    (response,) = await send_raw(
        proxy.port, b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n"
    )
    assert response.status == 403


@pytest_twisted.ensureDeferred
async def test_connect_to_a_closed_port_is_502(tmp_path):
    """CONNECT to a port where nothing listens gets 502."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    running = await start_proxy(tmp_path, connect_ports=frozenset({port}))
    try:
        (response,) = await send_raw(
            running.port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port
        )
    finally:
        await running.service.stopService()
    assert response.status == 502


@pytest_twisted.ensureDeferred
async def test_idle_tunnel_is_closed(tmp_path):
    """A tunnel that carries nothing for the idle timeout is closed."""
    echo, _ = _echo_server()
    port = echo.getHost().port
    running = await start_proxy(
        tmp_path, connect_ports=frozenset({port}), tunnel_idle_timeout=0.3
    )
    try:
        client = await _open_tunnel(running.port, port, b"")
        await client.gone.addTimeout(TIMEOUT, reactor)
    finally:
        await running.service.stopService()
        await echo.stopListening()
    assert client.data == ESTABLISHED
