"""The client side: one Twisted protocol per client connection over httptools' parser.

Rules of this module:
- Bytes from the client go to llhttp (``httptools.HttpRequestParser``), which enforces
  RFC 9112 framing; anything it rejects is answered ``400`` and the connection closed.
- Requests are answered strictly in order (RFC 9112 section 9.3.2): a pipelined request
  waits, with its body buffered, until the response before it is complete, and reading
  from the client pauses meanwhile.
- Only the active request's L{ResponseWriter} writes to the transport.
- Header limits are ours to count (llhttp has none): a target over 8 KiB is ``414``, a
  header block over 64 KiB is ``431``.
"""

from __future__ import annotations

import typing
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cacheproxy.model import Headers, RequestHead, header_list, header_values

if TYPE_CHECKING:
    from cacheproxy.proxy import Proxy
    from cacheproxy.tunnel import Tunnel

log = Logger()

MAX_TARGET = 8 * 1024
MAX_HEADER_BLOCK = 64 * 1024
MAX_HEADERS = 256

_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    412: b"Precondition Failed",
    416: b"Range Not Satisfiable",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}


class RequestRejected(Exception):
    """A request the proxy refuses before handling it; carries the status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@implementer(IPushProducer)
class RequestBody:
    """A request body as it streams in from the client, handed to one consumer.

    It is the origin client's body producer: chunks that arrive before the consumer is
    attached are buffered (a pipelined request's body, or the first bytes after the
    head); afterwards they go straight through.

    @ivar length: the declared length, or None for a chunked body.
    @ivar present: whether the request has a body at all (RFC 9112 section 6.3).
    @ivar complete: the last byte has arrived.
    """

    def __init__(self, length: int | None, present: bool) -> None:
        self.length = length
        self.present = present
        self.complete = not present
        self._buffer: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._on_abandon: Callable[[], None] | None = None
        self.abandoned = False
        self._pause: Callable[[], None] | None = None
        self._resume: Callable[[], None] | None = None

    def feed(self, data: bytes) -> None:
        """Take a chunk from the parser."""
        if self._sink is None:
            self._buffer.append(data)
        else:
            self._sink(data)

    def end(self) -> None:
        """The parser reached the end of the body."""
        self.complete = True
        if self._on_end is not None:
            self._on_end()

    def attach(
        self,
        sink: Callable[[bytes], None],
        on_end: Callable[[], None],
        on_abandon: Callable[[], None] = lambda: None,
    ) -> None:
        """Send buffered and future chunks to ``sink``; call ``on_end`` at the end,
        or ``on_abandon`` if the client goes away first."""
        buffered, self._buffer = self._buffer, []
        self._sink = sink
        self._on_end = on_end
        self._on_abandon = on_abandon
        for chunk in buffered:
            sink(chunk)
        if self.complete:
            on_end()
        elif self.abandoned:
            on_abandon()

    def abandon(self) -> None:
        """The client left (or was cut off) before the body was complete."""
        self.abandoned = True
        if self._on_abandon is not None and not self.complete:
            self._on_abandon()

    def detach(self) -> None:
        """Drop the rest of the body (the origin gave up on it)."""
        self._sink = lambda data: None
        self._on_end = None

    def set_flow_control(
        self, pause: Callable[[], None], resume: Callable[[], None]
    ) -> None:
        """Give the hooks that pause and resume reading from the client."""
        self._pause, self._resume = pause, resume

    def pauseProducing(self) -> None:
        if self._pause is not None:
            self._pause()

    def resumeProducing(self) -> None:
        if self._resume is not None:
            self._resume()

    def stopProducing(self) -> None:
        self.detach()


class Channel(typing.Protocol):
    """What a L{ResponseWriter} needs of its connection."""

    connected: int

    def send(self, data: bytes) -> None: ...

    def response_finished(
        self, writer: ResponseWriter, keep_alive: bool, abort: bool = False
    ) -> None: ...

    def register_producer(self, producer: Any, streaming: bool) -> None: ...

    def unregister_producer(self) -> None: ...


class _Discard:
    """A channel to nowhere, for exchanges that no client waits for."""

    connected = 1

    def send(self, data: bytes) -> None:
        pass

    def response_finished(
        self, writer: ResponseWriter, keep_alive: bool, abort: bool = False
    ) -> None:
        pass

    def register_producer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregister_producer(self) -> None:
        pass


def discarding_writer(request: RequestHead) -> ResponseWriter:
    """A writer whose response goes nowhere (background revalidation)."""
    return ResponseWriter(_Discard(), request, keep_alive=True)


class ResponseWriter:
    """Writes one response to the client, framing its body (RFC 9112 section 6).

    A known length is sent with ``Content-Length``; an unknown one chunked to an
    HTTP/1.1 client, or delimited by closing the connection for HTTP/1.0.

    @ivar status: the status sent, 0 before the head is written.
    @ivar bytes_sent: bytes written to the client, head included.
    @ivar finished: the response is complete (or abandoned).
    """

    def __init__(self, channel: Channel, request: RequestHead, keep_alive: bool):
        self._channel = channel
        self._request = request
        self._keep_alive = keep_alive
        self._chunked = False
        # The body's end is marked by its length or last chunk, not by the close.
        self._delimited = False
        self._bodyless = request.method == b"HEAD"
        self.status = 0
        self.bytes_sent = 0
        self.finished = False
        self._held = b""

    @property
    def started(self) -> bool:
        """Whether the status line has been written."""
        return self.status != 0

    @property
    def connected(self) -> bool:
        """Whether the client is still there to read the response."""
        return bool(self._channel.connected) and not self.finished

    def start(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        length: int | None,
        *,
        block: bytes = b"",
        hold: bool = False,
    ) -> None:
        """Write the status line and header block; ``length`` None: not known yet.

        ``block``: header lines already encoded, sent before ``headers``.
        ``hold``: keep the head back and send it with the first piece of body, so
        that a small response goes out in one write.
        """
        if self.finished:
            return
        self.status = status
        if status in (204, 304) or 100 <= status < 200:
            self._bodyless = True
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b""))]
        if block:
            lines.append(block)
        lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        if not self._bodyless or (
            self._request.method == b"HEAD" and length is not None
        ):
            if length is not None:
                lines.append(b"Content-Length: %d\r\n" % length)
                self._delimited = True
            elif self._request.version == b"1.1":
                self._chunked = self._delimited = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self._keep_alive = False
        if not self._keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self._request.version == b"1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        head = b"".join(lines)
        if hold:
            self._held = head
        else:
            self._send(head)

    def write(self, data: bytes) -> None:
        """Send a piece of the body."""
        if self._bodyless or not data or self.finished:
            return
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._send(data)

    def finish(self) -> None:
        """End the response; the connection goes on to the next request or closes."""
        if self.finished:
            return
        if self._chunked:
            self._send(b"0\r\n\r\n")
        elif self._held:
            self._send(b"")
        self.finished = True
        self._channel.response_finished(self, self._keep_alive)

    def close_after(self) -> None:
        """Close the connection once this response is sent."""
        self._keep_alive = False

    def abort(self) -> None:
        """Give up mid-response: close the connection so the client sees truncation.

        A body with a length or in chunks is visibly cut short by an orderly close
        (RFC 9112 sections 6.3 and 8), which also lets the client read every byte
        sent before it; only a body delimited by the close itself needs a reset.
        """
        if self.finished:
            return
        self.finished = True
        self._channel.response_finished(
            self, keep_alive=False, abort=not self._delimited
        )

    def error(self, status: int, message: str, headers: Headers = ()) -> None:
        """Answer with a short plain-text error of the proxy's own."""
        body = message.encode("utf-8", "replace") + b"\n"
        if not self.started:
            # After most server errors the connection's state is in doubt; an
            # unreachable origin (502, 504) leaves it sound.
            self._keep_alive = self._keep_alive and (
                status < 500 or status in (502, 504)
            )
            self.start(
                status,
                _REASONS.get(status, b"Error"),
                ((b"Content-Type", b"text/plain; charset=utf-8"),) + headers,
                len(body),
                hold=True,
            )
            self.write(body)
            self.finish()
        else:
            self.abort()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Let ``producer`` be paused while the client reads slowly."""
        self._channel.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        """Forget the producer registered before."""
        self._channel.unregister_producer()

    def _send(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        self.bytes_sent += len(data)
        self._channel.send(data)


class _Pending:
    """A parsed request waiting for its turn (pipelining)."""

    def __init__(self, head: RequestHead, body: RequestBody, keep_alive: bool):
        self.head = head
        self.body = body
        self.keep_alive = keep_alive


class ProxyProtocol(Protocol):
    """One client connection: parse requests, run them one at a time, in order.

    @ivar proxy: the shared proxy state that handles each request.
    @ivar connected: the client connection is open.
    @ivar client: the client's address.
    @ivar local: the address and port the client reached the proxy at.
    @ivar tunnel: after a CONNECT, the tunnel that now owns the connection.
    @ivar secure_origin: after an intercepted CONNECT, ``https://host[:port]``: the
        connection now speaks TLS, and its origin-form targets name that origin.
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.connected = False
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Pending] = deque()
        self._active: ResponseWriter | None = None
        self._parsing: _Pending | None = None
        self._target = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._pauses: set[str] = set()
        self._closing = False
        self._tcp: Any = None
        self._connect: RequestHead | None = None
        self.tunnel: Tunnel | None = None
        self.secure_origin: bytes | None = None
        self.client = "-"
        self.local: tuple[str, int] = ("", 0)
        self.factory: ProxyFactory | None = None
        self._timer: IDelayedCall | None = None
        self._expiry: Callable[[], None] | None = None
        self._deadline = 0.0
        self._body_seen = 0.0
        self._direct = False

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.proxy.stats.connection_opened()
        self._arm(self.proxy.config.idle_timeout, self._idle_expired)
        # A TCP (or UNIX) transport: ITransport lacks the producer methods used here.
        self._tcp = self.transport
        peer: IAddress = self._tcp.getPeer()
        self.client = getattr(peer, "host", "-")
        here: IAddress = self._tcp.getHost()
        self.local = (getattr(here, "host", ""), getattr(here, "port", 0))
        if hasattr(self._tcp, "setTcpNoDelay"):
            self._tcp.setTcpNoDelay(True)
        self._direct = isinstance(self._tcp, tcp.Connection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self.secure_origin is not None and reason.check(SSL.Error):
            # Most often a client that does not trust the proxy's CA.
            log.info(
                "{client}: TLS for {origin} failed: {reason}",
                client=self.client,
                origin=self.secure_origin.decode("ascii", "replace"),
                reason=reason.getErrorMessage(),
            )
        self.proxy.stats.connection_closed()
        self._stop_timer()
        if self.factory is not None:
            self.factory.open -= 1
        if self.tunnel is not None:
            self.tunnel.client_lost()
        for pending in self._queue:
            pending.body.abandon()
        self._queue.clear()
        if self._parsing is not None:
            self._parsing.body.abandon()

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except RequestRejected as rejected:
            self._reject(rejected.status, rejected.message)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data, upgrade.args[0] if upgrade.args else len(data))
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, RequestRejected):
                self._reject(cause.status, cause.message)
            else:
                log.failure("request parsing failed", Failure(error))
                self._reject(400, "malformed request")
        except httptools.HttpParserError as error:
            self._reject(400, f"malformed request: {error}")

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._target.clear()
        self._headers = []
        self._framing = []
        self._header_bytes = 0
        self._arm(self.proxy.config.header_timeout, self._head_expired)

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > MAX_TARGET:
            raise RequestRejected(414, "request target longer than 8 KiB")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BLOCK:
            raise RequestRejected(431, "request header block larger than 64 KiB")
        if len(self._headers) >= MAX_HEADERS:
            raise RequestRejected(431, "too many request header fields")
        self._headers.append((name, value))
        lname = name.lower()
        if lname in _FRAMING_FIELDS:
            self._framing.append((lname, value))

    def on_headers_complete(self) -> None:
        headers = tuple(self._headers)
        target = bytes(self._target)
        if self.secure_origin is not None and target.startswith(b"/"):
            # RFC 9112 section 3.2.1: inside the tunnel the origin is the CONNECT's.
            target = self.secure_origin + target
        version = _VERSIONS.get(self._parser.get_http_version())
        if version is None:
            raise RequestRejected(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        head = RequestHead(self._parser.get_method(), target, version, headers)
        if head.method == b"CONNECT":
            self._connect = head
            return
        framing = self._framing
        _check_framing(head, framing)
        body = _request_body(framing)
        pending = _Pending(head, body, self._parser.should_keep_alive())
        self._parsing = pending if body.present else None
        if body.present:
            self._body_seen = self.proxy.reactor.seconds()
            self._arm(self.proxy.config.header_timeout, self._body_expired)
        else:
            self._disarm()
        self._queue.append(pending)
        if self._active is None:
            self._start_next()
        else:
            self._pause("pipeline")

    def on_body(self, data: bytes) -> None:
        if self._parsing is not None:
            self._body_seen = self.proxy.reactor.seconds()
            self._parsing.body.feed(data)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.body.end()
            self._parsing = None
            self._disarm()

    # -- timeouts ------------------------------------------------------------------

    def _arm(self, seconds: float, expired: Callable[[], None]) -> None:
        """Call ``expired`` in ``seconds`` unless re-armed or disarmed first.

        One reactor timer per connection serves every deadline: re-arming for a
        later time only moves the deadline, and the timer, when it fires early,
        sets itself again for what is left.  A keep-alive connection then costs
        no timer churn per request.
        """
        reactor = self.proxy.reactor
        self._expiry = expired
        self._deadline = reactor.seconds() + seconds
        timer = self._timer
        if timer is None:
            self._timer = reactor.callLater(seconds, self._timer_fired)
        elif timer.getTime() > self._deadline:
            timer.reset(seconds)

    def _disarm(self) -> None:
        """Forget the deadline (the timer, if it fires, finds nothing to do)."""
        self._expiry = None

    def _timer_fired(self) -> None:
        self._timer = None
        expired = self._expiry
        if expired is None:
            return
        remaining = self._deadline - self.proxy.reactor.seconds()
        if remaining > 0:
            self._timer = self.proxy.reactor.callLater(remaining, self._timer_fired)
            return
        self._expiry = None
        expired()

    def _stop_timer(self) -> None:
        self._expiry = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle_expired(self) -> None:
        """A keep-alive connection carried no request for the idle timeout."""
        if self._active is None and not self._queue:
            self._close(abort=False)

    def _head_expired(self) -> None:
        """A request head did not arrive whole in time (slowloris)."""
        self._timed_out("request header timeout")

    def _body_expired(self) -> None:
        """A request body stopped arriving."""
        timeout = self.proxy.config.header_timeout
        quiet = self.proxy.reactor.seconds() - self._body_seen
        if quiet < timeout:
            self._arm(timeout - quiet, self._body_expired)
            return
        self._timed_out("request body timeout")

    def _timed_out(self, what: str) -> None:
        log.info("{client}: {what}, closing", client=self.client, what=what)
        if self._active is None:
            self._reject(408, what)
        else:
            self._queue.clear()
            self._close(abort=True)

    # -- responses -----------------------------------------------------------------

    def _start_next(self) -> None:
        if not self._queue or not self.connected:
            return
        pending = self._queue.popleft()
        writer = ResponseWriter(self, pending.head, pending.keep_alive)
        self._active = writer
        body = pending.body
        if body.present:
            body.set_flow_control(
                lambda: self._pause("body"), lambda: self._resume("body")
            )
        if not body.complete and _expects_continue(pending.head):
            # RFC 9110 section 10.1.1: the proxy answers 100 itself and sends the
            # body on, rather than making the client wait for the origin.
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.proxy.handle(pending.head, body, writer, self)

    def response_finished(
        self, writer: ResponseWriter, keep_alive: bool, abort: bool = False
    ) -> None:
        """The active response ended; close, or go on to the next request."""
        if writer is not self._active:
            return
        self._active = None
        self.unregister_producer()
        if not keep_alive or abort:
            self._close(abort)
            return
        if self._queue:
            self._start_next()
        else:
            self._resume("pipeline")
            if self._parsing is None and self._expiry is None:
                self._arm(self.proxy.config.idle_timeout, self._idle_expired)

    @property
    def transport_handle(self) -> Any:
        """The client's TCP transport (for a tunnel to splice)."""
        return self._tcp

    def send(self, data: bytes) -> None:
        """Write to the client if it is still connected."""
        if self.connected:
            if self._direct:
                write_now(self._tcp, data)
            else:
                self._tcp.write(data)

    def register_producer(self, producer: Any, streaming: bool) -> None:
        """Register a producer on the client transport (backpressure)."""
        if self.connected:
            self._tcp.registerProducer(producer, streaming)

    def unregister_producer(self) -> None:
        """Unregister the producer, if any."""
        if self._tcp is not None and self._tcp.producer is not None:
            self._tcp.unregisterProducer()

    def _upgrade(self, data: bytes, offset: int) -> None:
        """llhttp stopped at a CONNECT or an ``Upgrade`` request."""
        if self._connect is not None:
            self._disarm()
            if self._active is not None or self._queue:
                # Pipelined behind another request: it cannot be answered in order.
                self._close(abort=False)
                return
            writer = ResponseWriter(self, self._connect, keep_alive=False)
            self._active = writer
            self.proxy.connect(self._connect, data[offset:], writer, self)
            return
        # Upgrade is hop-by-hop (RFC 9110 section 7.8): the request was already
        # handed on as an ordinary one; parse what follows with a fresh parser.
        self._parser = httptools.HttpRequestParser(self)
        if offset < len(data):
            self.dataReceived(data[offset:])

    def start_interception(
        self, established: bytes, creator: Any, origin: bytes, first: bytes
    ) -> None:
        """Answer an intercepted CONNECT with ``established``, then speak TLS
        (``creator``: the server side, from L{cacheproxy.intercept}) and parse the
        requests inside as requests for ``origin``."""
        if not self.connected:
            return
        self._tcp.write(established)
        self._active = None
        self._connect = None
        self._parser = httptools.HttpRequestParser(self)
        self.secure_origin = origin
        self._direct = False
        self._tcp.startTLS(creator)
        self._arm(self.proxy.config.header_timeout, self._head_expired)
        if first:
            # Bytes that came with the CONNECT are the start of the TLS handshake.
            self._tcp.protocol.dataReceived(first)

    def _reject(self, status: int, message: str) -> None:
        """Answer a request the parser or a limit refused, then close."""
        log.info(
            "rejected request from {client}: {status} {message}",
            client=self.client,
            status=status,
            message=message,
        )
        self._closing = True
        self._queue.clear()
        active = self._active
        if active is not None:
            if self._parsing is not None:
                # The body broke off: the origin must not get the rest of it.
                self._parsing.body.abandon()
                self._parsing = None
            if not active.started:
                # The request was handed on before its body turned out broken;
                # its answer is this error, and whatever the origin says is dropped.
                active.close_after()
                active.error(status, message)
                return
            # A response is under way; the client cannot be told in order.
            self._close(abort=False)
            return
        head = RequestHead(b"-", bytes(self._target[:200]) or b"-")
        writer = ResponseWriter(self, head, keep_alive=False)
        self._active = writer
        self.proxy.reject(head, writer, self, status, message)

    def _close(self, abort: bool) -> None:
        self._closing = True
        if not self.connected:
            return
        if abort:
            self._tcp.abortConnection()
        else:
            self._tcp.loseConnection()

    def _pause(self, why: str) -> None:
        if not self._pauses and self.connected:
            self._tcp.pauseProducing()
        self._pauses.add(why)

    def _resume(self, why: str) -> None:
        self._pauses.discard(why)
        if not self._pauses and self.connected:
            self._tcp.resumeProducing()


_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
"""The HTTP versions served, as httptools names them (RFC 9112 section 2.3)."""

_FRAMING_FIELDS = frozenset({b"host", b"transfer-encoding", b"content-length"})
"""Request fields that decide how the message is framed, noted as they arrive."""


def _check_framing(head: RequestHead, framing: list[tuple[bytes, bytes]]) -> None:
    """Refuse request framing that proxies and origins could read differently.

    ``framing``: the request's L{_FRAMING_FIELDS}, names lower-cased, in order.
    RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 request is faulty
    framing; section 6.3: a request whose final transfer coding is not chunked
    cannot be delimited.  Either is answered 400 and the connection closed.
    """
    hosts = sum(1 for name, _ in framing if name == b"host")
    if hosts > 1:
        # RFC 9112 section 3.2: more than one Host field line is a 400.
        raise RequestRejected(400, "more than one Host header field")
    if hosts == 0 and head.version == b"1.1":
        # RFC 9112 section 3.2: so is an HTTP/1.1 request without one.
        raise RequestRejected(400, "an HTTP/1.1 request needs a Host header field")
    codings = header_list(tuple(framing), b"transfer-encoding")
    if not codings:
        return
    if head.version == b"1.0":
        raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
    if codings[-1].lower() != b"chunked":
        raise RequestRejected(400, "the request's final transfer coding is not chunked")


def _request_body(framing: list[tuple[bytes, bytes]]) -> RequestBody:
    """The body framing the request declares (RFC 9112 section 6.3)."""
    if not framing or (len(framing) == 1 and framing[0][0] == b"host"):
        return RequestBody(None, present=False)  # the usual GET
    names = [name for name, _ in framing]
    if b"transfer-encoding" in names:
        return RequestBody(None, present=True)
    if b"content-length" in names:
        length = int(framing[names.index(b"content-length")][1])
        return RequestBody(length, present=length > 0)
    return RequestBody(None, present=False)


def _expects_continue(head: RequestHead) -> bool:
    return (
        any(
            v.strip().lower() == b"100-continue"
            for v in header_values(head.headers, b"expect")
        )
        and head.version == b"1.1"
    )


class _TooMany(Protocol):
    """Answers 503 to a connection past ``--max-connections`` and closes it."""

    def connectionMade(self) -> None:
        body = b"too many connections to the proxy; try again later\n"
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nRetry-After: 5\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        self.transport.loseConnection()  # type: ignore[union-attr]


class ProxyFactory(Factory):
    """Makes a L{ProxyProtocol} for every client connection, up to a limit.

    @ivar open: client connections open now.
    """

    noisy = False

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.open = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if self.open >= self.proxy.config.max_connections:
            log.warn(
                "{open} client connections open: refusing another with 503",
                open=self.open,
            )
            return _TooMany()
        self.open += 1
        protocol = ProxyProtocol(self.proxy)
        protocol.factory = self
        return protocol


def write_now(transport: tcp.Connection, data: bytes) -> None:
    """Write ``data`` to a TCP transport, sending at once what the socket takes.

    Twisted's ``write`` only queues and asks the reactor to watch for writability:
    two epoll changes and a trip round the loop for every response.  With nothing
    queued before it, the data may go straight to the socket instead, keeping the
    order of bytes; what the socket does not take, and everything while anything
    is queued, a producer is registered (Twisted drives it from its own writes)
    or TLS is on, goes through ``write`` as usual.
    """
    if (
        not transport.TLS
        and transport.producer is None
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, or broken: ``write`` queues it and finds out which.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
