"""The origin side: where requests leave the proxy for origins or a parent proxy.

Rules of this module:
- Direct requests go through L{cacheproxy.client.OriginClient}; with ``--upstream``,
  through Twisted's ProxyAgent.  Either way one pool for the whole proxy, so
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

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IReactorTime,
    IStreamClientEndpoint,
)
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


class Origin:
    """Sends requests to origins: directly with the lean L{OriginClient}, or through
    a parent proxy (``--upstream``) with Agent's ProxyAgent over a pool.

    @ivar timeout: seconds allowed for connecting and receiving the response head.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        per_host: int = 128,
        upstream: tuple[str, int] | None = None,
        tls: IPolicyForHTTPS | None = None,
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
        if upstream is None:
            endpoints = _Endpoints(
                reactor,
                timeout,
                tls if tls is not None else BrowserLikePolicyForHTTPS(),
            )
            self._client = OriginClient(
                reactor, endpoints, max_idle_per_host=per_host, body_timeout=timeout
            )
        else:
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
        if self._client is not None:
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
        if self._client is not None:
            return self._client.close()
        closed: defer.Deferred[None] = self._pool.closeCachedConnections()
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
