"""A lean HTTP/1.1 client for origins: httptools parsing over pooled connections.

It stands in for Twisted's Agent on direct (non-parent-proxy) requests, with the
contract ``Origin.request`` has: a Deferred of a response head whose body is
delivered to a protocol.

Rules of this module:
- One request at a time per connection; no pipelining (RFC 9112 section 9.3.2
  allows it, but a failure would then cost every queued request).
- The request head is encoded once, in one ``bytes.join``, and written with its
  body in one write when the body is already at hand.
- Message framing follows RFC 9112 section 6.3; llhttp (through httptools) does it
  for everything except responses to HEAD, which it cannot know about.
- A connection goes back to the pool only after a complete response whose framing
  and ``Connection`` fields allow it (RFC 9112 section 9.3), with the request body
  fully sent; anything else closes it.
- Failures look like Agent's: ``ResponseNeverReceived`` / ``ResponseFailed`` with
  the underlying reasons in ``reasons``, so ``describe_tls_failure`` reads them;
  connection errors from the endpoint are passed on unchanged.
"""

from __future__ import annotations

import re
from typing import Any

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestGenerationFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import URI, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from cacheproxy.model import Headers
from cacheproxy.server import RequestBody, write_now

# The same limit origin.py gives Agent's parser per line; here for the whole head.
MAX_HEAD = 64 * 1024
# Buffered body bytes (before deliverBody) past which reading from the origin pauses.
MAX_BUFFERED = 64 * 1024

# Agent's list of methods it retries once on a fresh connection (RFC 9110 section
# 9.2.2 makes PUT idempotent too; Agent leaves it out, and so do we).
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
# Methods whose semantics anticipate a body: sent with Content-Length: 0 when they
# have none (RFC 9110 section 8.6), as Agent does.
_EXPECTS_BODY = frozenset({b"PUT", b"POST"})
# Response fields Agent keeps out of IResponse.headers ("connection control");
# Connection stays, since the proxy must drop the fields it names.
_CONTROL = frozenset(
    {
        b"content-length",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
_CONTROL_LENGTHS = frozenset(len(name) for name in _CONTROL | {b"connection"})
# Lengths of the request field names request() looks at, to skip lower() otherwise.
_WATCHED_LENGTHS = frozenset({4, 10, 14, 17})
_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}
# An absolute URL: its scheme and authority, then path and query (RFC 3986
# section 3); the fragment is never sent (RFC 9112 section 3.2.1).
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)([^#]*)")


class OriginProtocolError(Exception):
    """The origin's response broke HTTP/1.1 framing or exceeded a limit."""


class OriginStalled(Exception):
    """The origin sent no body bytes for the body timeout while we were reading."""


class _HeadDone(Exception):
    """Stops llhttp after the head of a response to HEAD (it expects a body)."""


class _OriginInfo:
    """What requests to one origin share: its URI (for the endpoint), pool key
    and Host field."""

    __slots__ = ("uri", "key", "host")

    def __init__(self, uri: URI) -> None:
        self.uri = uri
        self.key: tuple[bytes, bytes, int] = (uri.scheme, uri.host, uri.port)
        self.host = _host_value(uri)


class _Request:
    """One request in flight: its encoded head, body and head Deferred.

    @ivar head: the request line and fields, encoded once (resent on a retry).
    @ivar body: the client's body, streamed after the head; None if there is none.
    @ivar retryable: idempotent and bodiless: may be resent once on a fresh
        connection when a reused one fails before any response byte.
    @ivar close: the request itself said ``Connection: close``.
    @ivar connection: the connection carrying it, once there is one.
    @ivar connecting: the endpoint's connect Deferred while a connection is made.
    """

    __slots__ = (
        "method",
        "head",
        "body",
        "chunked",
        "origin",
        "retryable",
        "retried",
        "close",
        "deferred",
        "connection",
        "connecting",
        "cancelled",
    )

    def __init__(
        self,
        method: bytes,
        head: bytes,
        body: RequestBody | None,
        origin: _OriginInfo,
        retryable: bool,
        close: bool,
    ) -> None:
        self.method = method
        self.head = head
        self.body = body
        self.chunked = body is not None and body.length is None
        self.origin = origin
        self.retryable = retryable
        self.retried = False
        self.close = close
        self.deferred: defer.Deferred[IResponse] = defer.Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: defer.Deferred[Any] | None = None
        self.cancelled = False

    def _cancel(self, deferred: defer.Deferred[IResponse]) -> None:
        """Abort the connection or connection attempt; the Deferred then fails
        with CancelledError."""
        self.cancelled = True
        connection = self.connection
        if connection is not None:
            connection.abandon(self)
        elif self.connecting is not None:
            self.connecting.cancel()


def _host_value(uri: URI) -> bytes:
    """The Host field for ``uri``, without a default port (RFC 9110 section 7.2)."""
    host = uri.host
    if b":" in host:
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host  # type: ignore[no-any-return]
    return b"%b:%d" % (host, uri.port)


def _encode_head(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: Headers,
    body: RequestBody | None,
) -> tuple[bytes, bool]:
    """The request head (RFC 9112 section 3) and whether it asks for ``close``.

    Fields go out as given, less the framing fields, which follow the body given
    (RFC 9112 sections 6.1 and 6.2); Host is added from the URL when absent.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    lines = 2
    has_host = close = False
    for name, value in headers:
        if len(name) in _WATCHED_LENGTHS:
            lname = name.lower()
            if lname == b"host":
                has_host = True
            elif lname == b"content-length" or lname == b"transfer-encoding":
                continue
            elif lname == b"connection" and b"close" in value.lower():
                close = True
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    if not has_host:
        parts += (b"Host: ", host, b"\r\n")
        lines += 1
    if body is not None and body.present:
        if body.length is None:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n" % body.length)
        lines += 1
    elif (body is not None and body.length == 0) or method in _EXPECTS_BODY:
        parts.append(b"Content-Length: 0\r\n")
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # A CR or LF inside a field would split it into a line of its own.
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("CR or LF inside the request line or a field")
    return head, close


def _persistent(version: tuple[bytes, int, int], connection: list[bytes]) -> bool:
    """Whether a response lets its connection be reused (RFC 9112 section 9.3)."""
    tokens = {t.strip().lower() for v in connection for t in v.split(b",")}
    if b"close" in tokens:
        return False
    return version >= (b"HTTP", 1, 1) or b"keep-alive" in tokens


@implementer(IResponse)
class OriginResponse:
    """A response head, and the transport its body protocol sees.

    What exchange.py uses of IResponse: ``code``, ``phrase``, ``version``,
    ``headers`` (Connection kept), ``length`` and ``deliverBody``.  The protocol
    given to deliverBody gets this object as its transport, a streaming producer:
    pausing it pauses reading from the origin.

    @ivar _connection: the connection the body still comes from, None once it ended.
    @ivar _protocol: the body's protocol, once deliverBody was called.
    @ivar _buffer: body pieces received before deliverBody.
    @ivar _ended: the end reason, kept for a protocol that has not come yet.
    @ivar _done: the end has been reported (or kept).
    @ivar _paused: the consumer paused the body.
    @ivar _held: reading paused because too much was buffered before deliverBody.
    @ivar _stopped: the consumer abandoned the body.
    """

    __slots__ = (
        "code",
        "phrase",
        "version",
        "raw_headers",
        "_headers",
        "length",
        "request",
        "previousResponse",
        "_connection",
        "_protocol",
        "_buffer",
        "_buffered",
        "_ended",
        "_done",
        "_paused",
        "_held",
        "_stopped",
    )

    def __init__(
        self,
        connection: _Connection,
        code: int,
        phrase: bytes,
        version: tuple[bytes, int, int],
        raw_headers: Headers,
        length: Any,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.version = version
        self.raw_headers = raw_headers
        self._headers: TwistedHeaders | None = None
        self.length = length
        self.request: Any = None
        self.previousResponse: Any = None
        self._connection: _Connection | None = connection
        self._protocol: IProtocol | None = None
        self._buffer: list[bytes] | None = None
        self._buffered = 0
        self._ended: Failure | None = None
        self._done = False
        self._paused = False
        self._held = False
        self._stopped = False

    @property
    def headers(self) -> TwistedHeaders:
        """The fields as IResponse has them, made when first asked for (the proxy
        itself reads L{raw_headers})."""
        if self._headers is None:
            self._headers = TwistedHeaders()
            for name, value in self.raw_headers:
                self._headers.addRawHeader(name, value)
        return self._headers

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        """Send the body, buffered pieces first, then its end, to ``protocol``."""
        if self._protocol is not None:
            raise RuntimeError("the body is already being delivered")
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        buffered, self._buffer = self._buffer, None
        if buffered:
            for chunk in buffered:
                protocol.dataReceived(chunk)
        if self._held:
            self._held = False
            connection = self._connection
            if connection is not None and not self._paused:
                connection.tcp.resumeProducing()
        ended, self._ended = self._ended, None
        if ended is not None:
            protocol.connectionLost(ended)

    def _data(self, chunk: bytes) -> None:
        """A piece of body from the parser."""
        if self._stopped:
            return
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(chunk)
        elif not self._stopped:
            if self._buffer is None:
                self._buffer = [chunk]
            else:
                self._buffer.append(chunk)
            self._buffered += len(chunk)
            connection = self._connection
            if self._buffered > MAX_BUFFERED and not self._held and connection:
                self._held = True
                connection.tcp.pauseProducing()

    def _end(self, reason: Failure) -> None:
        """The body ended (completely or not); tell the protocol once."""
        if self._done:
            return
        self._done = True
        self._connection = None
        protocol = self._protocol
        if protocol is None:
            self._ended = reason
        else:
            protocol.connectionLost(reason)

    @property
    def _reading_paused(self) -> bool:
        return self._paused or self._held

    def pauseProducing(self) -> None:
        """Stop reading from the origin until resumed."""
        self._paused = True
        connection = self._connection
        if connection is not None:
            connection.tcp.pauseProducing()

    def resumeProducing(self) -> None:
        """Read from the origin again."""
        self._paused = False
        connection = self._connection
        if connection is not None and not self._held:
            connection.tcp.resumeProducing()

    def stopProducing(self) -> None:
        """Abandon the body: the connection is closed, never pooled."""
        connection = self._connection
        if connection is not None and not self._done:
            self._stopped = True
            connection.tcp.abortConnection()


class _Connection(Protocol):
    """One HTTP/1.1 connection to an origin, carrying one request at a time.

    The parser's callbacks (``on_*``) are methods of this protocol; they only
    record what they see, except that the head Deferred fires as soon as the head
    is complete, so that body pieces in the same read go straight through.

    @ivar key: (scheme, host, port) of the origin, the pool's key.
    @ivar served: responses completed on this connection; more than 0 means a
        request sent now reuses it.
    @ivar idle_since: when it last went back to the pool.
    @ivar pooled: it is in the pool's idle list.
    @ivar _request: the request in flight, None while idle.
    @ivar _response: that request's response, once its head has arrived.
    @ivar _received: response bytes have arrived for the current request.
    @ivar _complete: the parser saw the end of the response.
    @ivar _keep: the response lets the connection be reused.
    @ivar _body_open: the request body is still being sent.
    @ivar _head_bytes: bytes read while the head was still incomplete.
    @ivar _field_bytes: bytes of the head's fields, counted as the parser sees them
        (a read can hold the head and body).
    """

    def __init__(self, client: OriginClient, key: tuple[bytes, bytes, int]) -> None:
        self._client = client
        self.key = key
        self._parser = _parser_for(self)
        self.served = 0
        self.idle_since = 0.0
        self.pooled = False
        self.lost: defer.Deferred[None] | None = None
        self._last_read = 0.0
        self._stall_timer: IDelayedCall | None = None
        self.tcp: Any = None
        self._request: _Request | None = None
        self._response: OriginResponse | None = None
        self._reused = False
        self._received = False
        self._complete = False
        self._keep = False
        self._interim = False
        self._head_bytes = 0
        self._field_bytes = 0
        self._phrase = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._content_length: bytes | None = None
        self._transfer_coding: bytes | None = None
        self._connection_values: list[bytes] = []
        self._error: Exception | None = None
        self._head_done = False
        self._body_open = False
        self._producing = False
        self._out: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.tcp = transport = self.transport
        # The head and a small body go in one write; a larger body follows in
        # pieces that Nagle's algorithm must not hold back.
        nodelay = getattr(transport, "setTcpNoDelay", None)
        if nodelay is None:  # TLS: the TCP transport is underneath
            below = getattr(transport, "transport", None)
            nodelay = getattr(below, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except OSError:
                pass

    # -- sending -------------------------------------------------------------------

    def send(self, request: _Request) -> None:
        """Send ``request``: its head, then its body as it streams in."""
        self._request = request
        request.connection = self
        self._reused = self.served > 0
        self._response = None
        self._received = self._complete = self._keep = self._interim = False
        self._head_done = False
        self._head_bytes = self._field_bytes = 0
        self._phrase = b""
        self._fields = []
        self._content_length = self._transfer_coding = None
        self._connection_values = []
        self._error = None
        transport = self.tcp
        body = request.body
        if body is None:
            if isinstance(transport, tcp.Connection):
                write_now(transport, request.head)
            else:
                transport.write(request.head)
            return
        self._body_open = True
        self._out = [request.head]
        sink = self._body_chunk if request.chunked else self._body_data
        body.attach(sink, self._body_end, self._body_abandoned)
        out, self._out = self._out, None
        if out is not None:
            transport.write(b"".join(out))
        if self._body_open:
            self._producing = True
            transport.registerProducer(body, True)

    def _body_data(self, data: bytes) -> None:
        """A piece of a body sent with Content-Length (RFC 9112 section 6.2)."""
        if self._out is not None:
            self._out.append(data)
        else:
            self.tcp.write(data)

    def _body_chunk(self, data: bytes) -> None:
        """A piece of a body sent chunked (RFC 9112 section 7.1)."""
        if not data:
            return  # an empty chunk would end the body
        pieces = (b"%x\r\n" % len(data), data, b"\r\n")
        if self._out is not None:
            self._out += pieces
        else:
            self.tcp.writeSequence(pieces)

    def _body_end(self) -> None:
        """The client's body ended: the last chunk, if chunked."""
        request = self._request
        if not self._body_open or request is None:
            return
        self._body_open = False
        if request.chunked:
            self._body_data(b"0\r\n\r\n")
        self._stop_body_producer()

    def _stop_body_producer(self) -> None:
        if self._producing:
            self._producing = False
            self.tcp.unregisterProducer()

    def _body_abandoned(self) -> None:
        """The client left before its body ended: the request cannot complete."""
        if not self._body_open:
            return
        reason = ConnectionError("the client left before its body ended")
        self._broken(reason, RequestGenerationFailed)

    def _drop_body(self, request: _Request) -> None:
        """Stop sending the request body (the exchange on this connection is over)."""
        if self._body_open:
            self._body_open = False
            self._stop_body_producer()
            if request.body is not None:
                request.body.detach()

    def abandon(self, request: _Request) -> None:
        """The request was cancelled: forget it and abort the connection."""
        if self._request is request:
            self._request = None
            self._drop_body(request)
            self.tcp.abortConnection()

    # -- parser callbacks ----------------------------------------------------------

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > MAX_HEAD:
            self._error = OriginProtocolError("the response head is too large")
            raise self._error
        if len(name) in _CONTROL_LENGTHS:
            lname = name.lower()
            if lname in _CONTROL:
                if lname == b"content-length":
                    self._content_length = value
                    request = self._request
                    # Agent keeps it for HEAD, where it describes the selected
                    # representation (RFC 9110 section 8.6).
                    if request is not None and request.method == b"HEAD":
                        self._fields.append((name, value))
                elif lname == b"transfer-encoding":
                    self._transfer_coding = value
                return
            if lname == b"connection":
                self._connection_values.append(value)
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._error = OriginProtocolError("unexpected 101 Switching Protocols")
                raise self._error
            # RFC 9110 section 15.2: an unexpected interim response is ignored.
            self._interim = True
            self._phrase = b""
            self._fields = []
            self._content_length = self._transfer_coding = None
            self._connection_values = []
            return
        request = self._request
        version = _VERSIONS.get(parser.get_http_version())
        if request is None or version is None:
            self._error = OriginProtocolError("not an HTTP/1.x response")
            raise self._error
        # RFC 9112 section 6.3: the length of the body, in the order of its items.
        head = request.method == b"HEAD"
        if head or status == 204 or status == 304:
            length: Any = 0
        elif self._transfer_coding is not None or self._content_length is None:
            length = UNKNOWN_LENGTH
        else:
            length = int(self._content_length)
        fields = tuple(self._fields)
        response = OriginResponse(self, status, self._phrase, version, fields, length)
        self._response = response
        if head:
            self._complete = self._head_done = True
            self._keep = _persistent(version, self._connection_values)
        deferred = request.deferred
        deferred.callback(response)
        if head:
            # llhttp would wait for the body Content-Length announces.
            raise _HeadDone()

    def on_body(self, chunk: bytes) -> None:
        response = self._response
        if response is not None:
            response._data(chunk)

    def on_message_begin(self) -> None:
        if self._complete:
            # Bytes after the end of the response: the connection is out of step.
            self._keep = False
            raise OriginProtocolError("data after the end of the response")

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        # Asked now: llhttp resets its flags once the callback returns.
        self._keep = self._parser.should_keep_alive()

    # -- receiving -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._request is None:
            # Nothing was asked: an idle connection speaking is out of step.
            self.tcp.abortConnection()
            return
        self._received = True
        self._last_read = self._client.now()
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            if not self._complete:
                self._broken(OriginProtocolError("unexpected protocol upgrade"))
                return
            self._keep = False
        except HttpParserError as reason:
            if not self._complete:
                self._broken(self._error or OriginProtocolError(str(reason)))
                return
            # A parser stopped after HEAD, or at bytes after the end, is spent.
            self._parser = _parser_for(self)
            if not (self._head_done and data.endswith(b"\n")):
                self._keep = False
        if self._complete:
            self._finish()
        elif self._response is not None:
            if self._stall_timer is None and self._client.body_timeout is not None:
                self._watch_body(self._client.body_timeout)
        else:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._broken(OriginProtocolError("the response head is too large"))

    def _watch_body(self, seconds: float) -> None:
        """Check in ``seconds`` that the body is still coming."""
        self._stall_timer = self._client.call_later(seconds, self._check_stall)

    def _check_stall(self) -> None:
        """Give up on a body that stopped arriving, unless we stopped reading it."""
        self._stall_timer = None
        response, timeout = self._response, self._client.body_timeout
        if response is None or timeout is None:
            return
        now = self._client.now()
        if response._reading_paused:
            # A slow client holds the origin back: not the origin's fault.
            self._last_read = now
            self._watch_body(timeout)
        elif now - self._last_read >= timeout:
            self._broken(OriginStalled(f"the origin sent nothing for {timeout:g} s"))
        else:
            self._watch_body(timeout - (now - self._last_read))

    def _stop_watching(self) -> None:
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None

    def _finish(self) -> None:
        """The response is complete: pool or close the connection, end the body."""
        self._stop_watching()
        request, response = self._request, self._response
        self._request = self._response = None
        if request is None or response is None:
            return
        request.connection = None
        self.served += 1
        keep = self._keep and not request.close and not self._body_open
        self._drop_body(request)
        stopped = response._stopped
        if response._reading_paused and not stopped:
            self.tcp.resumeProducing()
        if keep and not stopped:
            self._client._release(self)
        elif not stopped:
            self.tcp.loseConnection()
        if stopped:
            response._end(Failure(ResponseFailed([Failure(ConnectionAborted())])))
        else:
            response._end(Failure(ResponseDone()))

    def _broken(self, reason: Exception, wrapper: type = ResponseFailed) -> None:
        """The exchange failed here: abort the connection and report ``reason``."""
        self._stop_watching()
        request, response = self._request, self._response
        self._request = self._response = None
        self.tcp.abortConnection()
        if request is None:
            return
        self._drop_body(request)
        failure = Failure(wrapper([Failure(reason)]))
        if response is not None:
            response._end(failure)
        elif not request.cancelled and not request.deferred.called:
            request.deferred.errback(failure)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_watching()
        self._client._forget(self)
        if self.lost is not None:
            self.lost.callback(None)
        request, response = self._request, self._response
        self._request = self._response = None
        if request is None:
            return
        self._drop_body(request)
        if response is None:
            self._lost_before_head(request, reason)
            return
        chunked = (self._transfer_coding or b"").rstrip().lower().endswith(b"chunked")
        if (
            response.length is UNKNOWN_LENGTH
            and not chunked
            and not response._stopped
            and reason.check(ConnectionDone)
        ):
            # RFC 9112 section 6.3 item 8: the close ends the body; nothing tells
            # whether all of it came.
            response._end(Failure(PotentialDataLoss()))
        else:
            response._end(Failure(ResponseFailed([reason])))

    def _lost_before_head(self, request: _Request, reason: Failure) -> None:
        """Retry on a fresh connection, or fail the request as Agent would."""
        request.connection = None
        if request.cancelled or request.deferred.called:
            return
        if (
            self._reused
            and not self._received
            and request.retryable
            and not request.retried
        ):
            # The origin closed the idle connection as the request went out
            # (RFC 9112 section 9.3.1 allows an automatic retry).
            request.retried = True
            self._client._connect(request)
            return
        wrapper = ResponseFailed if self._received else ResponseNeverReceived
        request.deferred.errback(Failure(wrapper([reason])))


class _ConnectionFactory(Factory):
    """Makes the protocol for one connection attempt to ``key``."""

    noisy = False

    def __init__(self, client: OriginClient, key: tuple[bytes, bytes, int]) -> None:
        self._client = client
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._client, self._key)


class OriginClient:
    """Sends requests to origins over pooled HTTP/1.1 connections.

    @ivar max_idle_per_host: idle connections kept per (scheme, host, port).
    @ivar idle_timeout: seconds an idle connection is kept.
    @ivar body_timeout: seconds a response body may send nothing, while read,
        before the response fails (None: no limit).
    @ivar _idle: idle connections per key, the most recently used last.
    @ivar _sweeper: the call that closes connections idle too long, if due.
    @ivar _closed: close() was called; connections are no longer pooled.
    @ivar _origins: parsed origins by scheme and authority (cleared past
        L{ORIGINS}).
    """

    ORIGINS = 4096

    def __init__(
        self,
        reactor: Any,
        endpoints: IAgentEndpointFactory,
        *,
        max_idle_per_host: int = 128,
        idle_timeout: float = 60,
        body_timeout: float | None = None,
    ) -> None:
        self._reactor = reactor
        self.body_timeout = body_timeout
        self._endpoints = endpoints
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._origins: dict[bytes, _OriginInfo] = {}
        self._sweeper: IDelayedCall | None = None
        self._closed = False

    def now(self) -> float:
        """The reactor's clock."""
        return float(self._reactor.seconds())

    def call_later(self, seconds: float, function: Any) -> IDelayedCall:
        """Schedule ``function`` on the reactor."""
        call: IDelayedCall = self._reactor.callLater(seconds, function)
        return call

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: RequestBody | None
    ) -> defer.Deferred[IResponse]:
        """Send a request; the Deferred fires with the response head.

        Cancelling it before the head arrives aborts the connection.
        """
        try:
            origin, target = self._parse(url)
            head, close = _encode_head(method, target, origin.host, headers, body)
        except Exception:
            return defer.fail()
        streamed = body if body is not None and body.present else None
        retryable = (
            streamed is None
            and (body is None or body.length != 0)
            and method in _RETRYABLE
        )
        request = _Request(method, head, streamed, origin, retryable, close)
        idle = self._idle.get(origin.key)
        if idle:
            connection = idle.pop()
            connection.pooled = False
            if not idle:
                del self._idle[origin.key]
            connection.send(request)
        else:
            self._connect(request)
        return request.deferred

    def _parse(self, url: bytes) -> tuple[_OriginInfo, bytes]:
        """The origin of an absolute URL and the request-target in origin-form.

        URI.fromBytes parses each scheme and authority once (it costs more than
        the rest of a request); the path and query are sent as they came, "/"
        when empty (RFC 9112 section 3.2.1).
        """
        match = _ABSOLUTE.match(url)
        if match is None:
            raise ValueError(f"not an absolute URL: {url!r}")
        prefix, target = match.groups()
        origin = self._origins.get(prefix)
        if origin is None:
            if len(self._origins) >= self.ORIGINS:
                self._origins.clear()
            origin = self._origins[prefix] = _OriginInfo(URI.fromBytes(prefix))
        if not target.startswith(b"/"):
            target = b"/" + target
        return origin, target

    def _connect(self, request: _Request) -> None:
        """Open a new connection for ``request``."""
        try:
            origin = request.origin
            endpoint = self._endpoints.endpointForURI(origin.uri)
            connecting = endpoint.connect(_ConnectionFactory(self, origin.key))
        except Exception:
            request.deferred.errback()
            return
        request.connecting = connecting
        connecting.addCallbacks(
            self._connected,
            self._not_connected,
            callbackArgs=(request,),
            errbackArgs=(request,),
        )

    def _connected(self, connection: _Connection, request: _Request) -> None:
        request.connecting = None
        if request.cancelled:
            connection.tcp.loseConnection()
            return
        connection.send(request)

    def _not_connected(self, failure: Failure, request: _Request) -> None:
        request.connecting = None
        if not request.cancelled and not request.deferred.called:
            request.deferred.errback(failure)

    def _release(self, connection: _Connection) -> None:
        """Keep a connection whose response is complete for the next request."""
        if self._closed or self.max_idle_per_host <= 0:
            connection.tcp.loseConnection()
            return
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = []
        elif len(idle) >= self.max_idle_per_host:
            oldest = idle.pop(0)
            oldest.pooled = False
            oldest.tcp.loseConnection()
        connection.pooled = True
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.idle_timeout, self._sweep)

    def _forget(self, connection: _Connection) -> None:
        """A connection closed: take it out of the pool if it is there."""
        if not connection.pooled:
            return
        connection.pooled = False
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``; come back for the next."""
        self._sweeper = None
        now = self._reactor.seconds()
        deadline = now - self.idle_timeout
        earliest: float | None = None
        for key in list(self._idle):
            idle = self._idle[key]
            while idle and idle[0].idle_since <= deadline:
                expired = idle.pop(0)
                expired.pooled = False
                expired.tcp.loseConnection()
            if not idle:
                del self._idle[key]
            elif earliest is None or idle[0].idle_since < earliest:
                earliest = idle[0].idle_since
        if earliest is not None:
            delay = max(earliest + self.idle_timeout - now, 0.0)
            self._sweeper = self._reactor.callLater(delay, self._sweep)

    def idle_connections(self, scheme: bytes, host: bytes, port: int) -> int:
        """How many idle connections the pool keeps for an origin."""
        return len(self._idle.get((scheme, host, port), ()))

    def close(self) -> defer.Deferred[None]:
        """Close every idle connection; fires once they are closed.

        Connections still carrying a response are closed when it completes.
        """
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        waits: list[defer.Deferred[None]] = []
        for idle in self._idle.values():
            for connection in idle:
                connection.pooled = False
                connection.lost = defer.Deferred()
                waits.append(connection.lost)
                connection.tcp.loseConnection()
        self._idle.clear()
        done: defer.Deferred[None] = defer.gatherResults(waits).addCallback(
            lambda _: None
        )
        return done


def _parser_for(protocol: Any) -> HttpResponseParser:
    """An httptools response parser calling back ``protocol``.

    RFC 9112 section 2.2: a recipient MAY take a bare LF as a line terminator;
    some old origins send one, and on responses (unlike requests) accepting it
    opens no smuggling path, so it is accepted as Agent and browsers do.
    """
    parser = HttpResponseParser(protocol)
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser
