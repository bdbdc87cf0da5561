"""CONNECT tunnels: the client's connection spliced with one to the target.

Rules of this module:
- Bytes go both ways untouched; each side's transport is the other's producer, so a
  slow reader on one side pauses reading on the other (as in Twisted's portforward).
- The tunnel's first bytes may arrive in the same packet as the CONNECT request; they
  are held until the target is connected, then sent first.
- When either side closes, the other is closed after its pending writes; a tunnel that
  carries nothing for ``idle_timeout`` seconds is closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def parse_authority(target: bytes) -> tuple[str, int]:
    """``host:port`` of a CONNECT request (RFC 9110 section 9.3.6), IPv6 in brackets.

    Raises ValueError when it is not one.
    """
    text = target.decode("ascii")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"not host:port: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "/@ []") or ("[" in text) != (":" in host):
        raise ValueError(f"not host:port: {text!r}")
    return host, int(port)


class ParentRefused(Exception):
    """The parent proxy did not open the tunnel; carries its status line."""


class _TargetSide(Protocol):
    """The connection to the CONNECT target, or to a parent proxy that opens it.

    Through a parent, the side first sends its own CONNECT and waits for the
    parent's answer (RFC 9110 section 9.3.6); bytes after that answer belong to
    the tunnel.
    """

    MAX_HEAD = 64 * 1024

    def __init__(self, tunnel: Tunnel, parent_request: bytes | None) -> None:
        self._tunnel = tunnel
        self._parent_request = parent_request
        self._head = b""
        self.ready: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self._parent_request is None:
            self.ready.callback(None)
        else:
            self.transport.write(self._parent_request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.ready.called:
            self._tunnel.from_target(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > self.MAX_HEAD:
                self._refused(b"parent proxy's answer too long")
            return
        status_line = self._head.split(b"\r\n", 1)[0]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].startswith(b"2"):
            self._refused(status_line)
            return
        rest = self._head[end + 4 :]
        self._head = b""
        self.ready.callback(None)
        if rest:
            self._tunnel.from_target(rest)

    def _refused(self, status_line: bytes) -> None:
        self.ready.errback(ParentRefused(status_line.decode("latin-1")))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
            return
        self._tunnel.target_lost()


class Tunnel:
    """One CONNECT tunnel between a client transport and a target.

    @ivar up: bytes sent from the client to the target.
    @ivar down: bytes sent from the target to the client.
    @ivar established: the target accepted the connection.
    """

    def __init__(
        self,
        reactor: Any,
        client: Any,
        idle_timeout: float,
        on_close: Callable[[Tunnel], None],
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._target: Any = None
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._pending: list[bytes] = []
        self._idle: IDelayedCall | None = None
        self._closed = False
        self.up = 0
        self.down = 0
        self.established = False

    async def open(
        self,
        host: str,
        port: int,
        timeout: float,
        first: bytes,
        *,
        parent: tuple[str, int] | None = None,
        via: bytes = b"",
    ) -> None:
        """Connect to ``host:port``, directly or through a ``parent`` proxy.

        Raises the connection error, or L{ParentRefused}, if that fails.
        """
        if first:
            self._pending.append(first)
        self._client.pauseProducing()
        request = None
        if parent is not None:
            authority = (f"[{host}]" if ":" in host else host).encode() + b":%d" % port
            request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (authority, authority)
            request += (b"Via: %s\r\n" % via if via else b"") + b"\r\n"
            host, port = parent
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        side = _TargetSide(self, request)
        try:
            connecting = connect_quietly(endpoint, side)
            connecting.addTimeout(timeout, self._reactor)
            await connecting
            ready = side.ready
            ready.addTimeout(timeout, self._reactor)
            await ready
        except BaseException:
            self._client.resumeProducing()
            if side.transport is not None:
                side.transport.loseConnection()
            raise
        self._target = side.transport

    def splice(self, greeting: bytes) -> None:
        """Send ``greeting`` to the client, then let bytes flow both ways."""
        if self._target is None:
            return
        self.established = True
        self._client.write(greeting)
        pending, self._pending = self._pending, []
        for data in pending:
            self.from_client(data)
        # Backpressure both ways, as twisted.protocols.portforward does.
        self._client.registerProducer(self._target, True)
        self._target.registerProducer(self._client, True)
        self._client.resumeProducing()
        self._touch()

    def from_client(self, data: bytes) -> None:
        """Bytes from the client, for the target."""
        if self._target is None:
            self._pending.append(data)
            return
        self.up += len(data)
        self._target.write(data)
        self._touch()

    def from_target(self, data: bytes) -> None:
        """Bytes from the target, for the client."""
        self.down += len(data)
        self._client.write(data)
        self._touch()

    def client_lost(self) -> None:
        """The client closed its side."""
        if self._target is not None:
            self._target.loseConnection()
        self._close()

    def target_lost(self) -> None:
        """The target closed its side."""
        if self.established:
            self._client.loseConnection()
            self._close()

    def _touch(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        elif not self._closed:
            self._idle = self._reactor.callLater(self._idle_timeout, self._expire)

    def _expire(self) -> None:
        log.info("closing a tunnel idle for {seconds:g} s", seconds=self._idle_timeout)
        self._client.loseConnection()
        if self._target is not None:
            self._target.loseConnection()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._on_close(self)


class _OneProtocol(Factory):
    """Builds the one protocol it was given, like the factory of Twisted's
    ``connectProtocol``, but without a pair of log lines per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def connect_quietly(
    endpoint: IStreamClientEndpoint, protocol: Protocol
) -> defer.Deferred[IProtocol]:
    """Connect ``protocol`` through ``endpoint`` (``connectProtocol``, minus the
    "Starting factory" / "Stopping factory" lines in the log)."""
    return endpoint.connect(_OneProtocol(protocol))
