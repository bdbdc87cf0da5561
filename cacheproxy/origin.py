"""The origin side: where requests leave the proxy for origins or a parent proxy.

Rules of this module:
- Direct requests go through L{cacheproxy.client.OriginClient}; with ``--upstream``,
  ``http://`` through Twisted's ProxyAgent and ``https://`` through the parent's
  CONNECT tunnels (L{_ThroughParent}).  Either way one pool for the whole proxy, so
  connections to an origin are reused across clients.
- No content decoding, no redirect following: the proxy relays what the origin said,
  verbatim.
- Connecting and waiting for the response head share one deadline (``timeout``); past it
  the request fails with L{OriginTimeout}.  A body that then sends nothing for as long
  (while it is read: a slow client pausing us does not count) fails too.
- ``https://`` origins (requests inside an intercepted CONNECT) are verified fully by
  the TLS policy given (the system trust store, or ``--upstream-ca``); a failure is
  an error, never a fallback to anything weaker.
- Endpoints are made once per scheme, host and port and reused: making one costs an
  IDNA encoding, which a busy origin should not pay per request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ProxyAgent,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from cacheproxy.client import OriginClient, OriginResponse
from cacheproxy.model import Headers
from cacheproxy.server import RequestBody
from cacheproxy.tunnel import connect_quietly


class _ConnectionShowingParser(_newclient.HTTPClientParser):
    """Agent's response parser, but leaving ``Connection`` in the response headers.

    Agent keeps ``Connection`` to itself, and with it the names of the fields that the
    origin declared hop-by-hop; the proxy must drop those (RFC 9110 section 7.6.1).
    """

    # LineReceiver's default of 16 KiB would cut long Set-Cookie or CSP fields; the
    # proxy allows an origin the same 64 KiB per field it allows a client's block.
    MAX_LENGTH = 64 * 1024

    def headerReceived(self, name: bytes, value: bytes) -> None:
        super().headerReceived(name, value)
        if name.lower() == b"connection":
            self.headers.addRawHeader(b"Connection", value)


def _show_connection_field() -> None:
    """Make Agent's HTTP/1.1 client use L{_ConnectionShowingParser}.

    Agent offers no hook for its parser; HTTP11ClientProtocol looks the class up by
    name in its module, so replacing that name is the narrowest change possible.
    """
    _newclient.HTTPClientParser = _ConnectionShowingParser  # type: ignore[misc]


class _QuietFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per origin connection."""

    noisy = False


class _QuietPool(HTTPConnectionPool):
    """A connection pool whose connections are not announced in the log."""

    _factory = _QuietFactory


class OriginTimeout(Exception):
    """The origin did not connect or start its response in time."""


@implementer(IBodyProducer)
class BodyProducer:
    """Feeds a client's streamed L{RequestBody} to Agent, with backpressure.

    @ivar length: the declared length or UNKNOWN_LENGTH (Agent then sends chunked).
    """

    def __init__(self, body: RequestBody) -> None:
        self._body = body
        self.length: Any = body.length if body.length is not None else UNKNOWN_LENGTH

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()

        def end() -> None:
            if not done.called:
                done.callback(None)

        def abandon() -> None:
            # Agent then abandons the request instead of waiting for the rest.
            if not done.called:
                done.errback(ConnectionError("the client left before its body ended"))

        self._body.attach(consumer.write, end, abandon)
        return done

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self._body.stopProducing()


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Agent's endpoints, one per (scheme, host, port), TLS-wrapped for https.

    @ivar _cache: the endpoints made so far (cleared past L{LIMIT}).
    """

    LIMIT = 4096

    def __init__(self, reactor: Any, timeout: float, tls: IPolicyForHTTPS) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._tls = tls
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is not None:
            return endpoint
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        endpoint = HostnameEndpoint(
            self._reactor, uri.host, uri.port, timeout=self._timeout
        )
        if uri.scheme == b"https":
            creator = self._tls.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        if len(self._cache) >= self.LIMIT:
            self._cache.clear()
        self._cache[key] = endpoint
        return endpoint


class _ParentHandshake(Protocol):
    """Asks a parent proxy for a tunnel (RFC 9110 section 9.3.6) and waits for its
    2xx; the connection is then handed over (L{_ThroughParent})."""

    MAX_HEAD = 64 * 1024

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._head = b""
        self.opened: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.opened.called:
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > self.MAX_HEAD:
                self._refuse(b"an answer too long")
            return
        status_line = self._head.split(b"\r\n", 1)[0]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].startswith(b"2"):
            self._refuse(status_line)
            return
        # Anything after the parent's answer is already the origin's (TLS) bytes.
        self.opened.callback(self._head[end + 4 :])

    def _refuse(self, answer: bytes) -> None:
        text = answer.decode("latin-1")
        refused = f"the parent proxy refused the tunnel: {text}"
        self.opened.errback(error.ConnectError(string=refused))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.opened.called:
            self.opened.errback(reason)


@implementer(IStreamClientEndpoint)
class _ThroughParent:
    """Reaches an https origin through a CONNECT tunnel of the parent proxy, then
    speaks TLS to the origin itself, verified as a direct connection would be.

    With ``--upstream`` and ``--intercept`` together, the origin's certificate is
    still checked here, end to end through the parent's blind tunnel.
    """

    def __init__(
        self,
        reactor: Any,
        parent: tuple[str, int],
        uri: URI,
        timeout: float,
        tls: IPolicyForHTTPS,
        via: bytes,
    ) -> None:
        self._reactor = reactor
        self._parent = parent
        self._timeout = timeout
        self._creator = tls.creatorForNetloc(uri.host, uri.port)
        host = uri.host
        authority = (b"[%s]" % host if b":" in host else host) + b":%d" % uri.port
        self._request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
            authority,
            authority,
            b"Via: %s\r\n" % via if via else b"",
        )

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        endpoint = HostnameEndpoint(
            self._reactor, self._parent[0], self._parent[1], timeout=self._timeout
        )
        handshake = _ParentHandshake(self._request)
        await connect_quietly(endpoint, handshake)
        opened = handshake.opened
        opened.addTimeout(self._timeout, self._reactor)
        try:
            early = await opened
        except BaseException:
            if handshake.transport is not None:
                handshake.transport.loseConnection()
            raise
        transport: Any = handshake.transport
        protocol = factory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.loseConnection()
            raise error.ConnectError(string="the connection was refused locally")
        # Hand the connection over: TLS wraps the new protocol, which then sees the
        # tunnel as its own connection to the origin.
        transport.protocol = protocol
        transport.startTLS(self._creator)
        protocol.makeConnection(transport)
        if early:
            transport.protocol.dataReceived(early)
        return protocol


@implementer(IAgentEndpointFactory)
class _ParentEndpoints:
    """Endpoints for ``https://`` origins through the parent proxy (cached)."""

    def __init__(
        self,
        reactor: Any,
        parent: tuple[str, int],
        timeout: float,
        tls: IPolicyForHTTPS,
        via: bytes,
    ) -> None:
        self._reactor = reactor
        self._parent = parent
        self._timeout = timeout
        self._tls = tls
        self._via = via
        self._cache: dict[tuple[bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported("only https:// goes through a parent's tunnel")
        key = (uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            if len(self._cache) >= _Endpoints.LIMIT:
                self._cache.clear()
            endpoint = self._cache[key] = _ThroughParent(
                self._reactor, self._parent, uri, self._timeout, self._tls, self._via
            )
        return endpoint


class Origin:
    """Sends requests to origins: directly with the lean L{OriginClient}, or through
    a parent proxy (``--upstream``): ``http://`` with Agent's ProxyAgent over a pool,
    ``https://`` (intercepted) with L{OriginClient} through the parent's tunnels.

    @ivar timeout: seconds allowed for connecting and receiving the response head.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        per_host: int = 128,
        upstream: tuple[str, int] | None = None,
        tls: IPolicyForHTTPS | None = None,
        via: bytes = b"",
    ) -> None:
        self._reactor: IReactorTime = reactor
        self.timeout = timeout
        self._pool = _QuietPool(reactor, persistent=True)
        # Squid keeps every idle origin connection; a low cap here means a new
        # connection for most requests under concurrency.
        self._pool.maxPersistentPerHost = per_host
        self._pool.cachedConnectionTimeout = 60
        self._agent: ProxyAgent | None = None
        self._client: OriginClient | None = None
        tls = tls if tls is not None else BrowserLikePolicyForHTTPS()
        if upstream is None:
            endpoints: IAgentEndpointFactory = _Endpoints(reactor, timeout, tls)
        else:
            endpoints = _ParentEndpoints(reactor, upstream, timeout, tls, via)
        self._client = OriginClient(
            reactor, endpoints, max_idle_per_host=per_host, body_timeout=timeout
        )
        if upstream is not None:
            # A parent proxy gets absolute-form requests over pooled connections.
            parent = HostnameEndpoint(
                reactor, upstream[0], upstream[1], timeout=timeout
            )
            self._agent = ProxyAgent(parent, reactor, pool=self._pool)
        _show_connection_field()

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: RequestBody | None
    ) -> defer.Deferred[IResponse]:
        """Send a request; the Deferred fires with the response head."""
        d: defer.Deferred[IResponse]
        if self._agent is None or url[:8].lower() == b"https://":
            assert self._client is not None
            d = self._client.request(method, url, headers, body)
            d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=self._timed_out)
            return d
        assert self._agent is not None
        twisted_headers = TwistedHeaders()
        for name, value in headers:
            twisted_headers.addRawHeader(name, value)
        producer = BodyProducer(body) if body is not None and body.present else None
        if producer is None and body is not None and body.length == 0:
            producer = BodyProducer(body)
        d = self._agent.request(method, url, twisted_headers, producer)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result: object, timeout: float) -> object:
        raise OriginTimeout(f"no response within {timeout:g} s")

    def close(self) -> defer.Deferred[None]:
        """Close pooled connections."""
        closing = [self._pool.closeCachedConnections()]
        if self._client is not None:
            closing.append(self._client.close())
        await_all = defer.gatherResults(closing)
        closed: defer.Deferred[None] = await_all.addCallback(lambda _: None)
        return closed


def response_fields(response: IResponse) -> Headers:
    """The response's header fields as raw pairs, in the order received."""
    if isinstance(response, OriginResponse):
        return response.raw_headers
    return tuple(
        (name, value)
        for name, values in response.headers.getAllRawHeaders()
        for value in values
    )
