"""One proxied request: look up, serve a hit, revalidate, or fetch and store.

Rules of this module:
- Every request gets exactly one response or one error, never both; an exception in one
  exchange is logged and answered ``500`` (or the connection closed if the response had
  begun) and never reaches another exchange.
- The origin's body is teed as it arrives: to the client (the origin transport is the
  client transport's producer, so a slow client slows the origin) and into a store
  writer, which is committed only if the body arrived complete.
- RFC 9111 decisions come from L{cacheproxy.policy}; this module only applies them.
- Store calls that touch SQLite run in the store's thread pool, never on the reactor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, TypeVar

from twisted.internet import defer, error, threads
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from cacheproxy import policy
from cacheproxy.accesslog import AccessLog, squid_line
from cacheproxy.model import (
    Config,
    Entry,
    Headers,
    RequestHead,
    ResponseHead,
    header_value,
    with_header,
    without_headers,
)
from cacheproxy.origin import Origin, OriginTimeout
from cacheproxy.server import RequestBody, ResponseWriter
from cacheproxy.store import BodyWriter, Store

log = Logger()

T = TypeVar("T")

# Fields of the client's request that the proxy does not pass on: Host is rebuilt from
# the absolute target (RFC 9112 section 3.2.2), Expect is answered by the proxy itself,
# and Agent frames the body it sends (Content-Length or chunked) on its own.
_NOT_FORWARDED = frozenset({b"host", b"expect", b"content-length"})
# The client's validators, replaced by the stored response's when revalidating.
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since"})
# Framing fields: the proxy frames every message it sends itself.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class Proxy:
    """What all client connections share: the store, the origin client, the log.

    @ivar reactor: the reactor everything runs on.
    @ivar config: the validated command line.
    @ivar store: the disk store.
    @ivar origin: the pooled origin client.
    @ivar access_log: where one line per request goes.
    @ivar via: this proxy's ``Via`` member (RFC 9110 section 7.6.3).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        store: Store,
        origin: Origin,
        access_log: AccessLog,
        pseudonym: str,
        threadpool: ThreadPool,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.store = store
        self.origin = origin
        self.access_log = access_log
        self.pseudonym = pseudonym
        self.via = b"1.1 " + pseudonym.encode("ascii")
        self._threadpool = threadpool

    def handle(
        self,
        request: RequestHead,
        body: RequestBody,
        writer: ResponseWriter,
        client: str,
    ) -> None:
        """Answer one request from ``client`` through ``writer``."""
        exchange = Exchange(self, request, body, writer, client)
        defer.ensureDeferred(exchange.run())

    def reject(
        self,
        request: RequestHead,
        writer: ResponseWriter,
        client: str,
        status: int,
        message: str,
    ) -> None:
        """Answer a request refused before it was parsed whole."""
        exchange = Exchange(self, request, RequestBody(None, False), writer, client)
        exchange.fail(status, message)
        exchange.log_access()

    def in_thread(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run a blocking store call in the store's thread pool."""
        return threads.deferToThreadPool(
            self.reactor, self._threadpool, function, *args
        )


class Exchange:
    """One request from a client and the response it gets.

    @ivar code: the Squid result code for the access log (``TCP_HIT``, ``TCP_MISS``...).
    @ivar hierarchy: Squid's hierarchy field (``HIER_DIRECT/host`` when fetched).
    """

    def __init__(
        self,
        proxy: Proxy,
        request: RequestHead,
        body: RequestBody,
        writer: ResponseWriter,
        client: str,
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.body = body
        self.writer = writer
        self.client = client
        self.started = proxy.reactor.seconds()
        self.key = ""
        self.code = "TCP_MISS"
        self.hierarchy = "HIER_NONE/-"
        self.content_type: bytes | None = None

    async def run(self) -> None:
        """Answer the request, whatever happens, and log it."""
        try:
            await self._route()
        except Exception:
            log.failure(
                "error while proxying {url}", url=self.request.target.decode("latin-1")
            )
            if self.writer.started:
                self.code = "NONE_NONE"
                self.writer.abort()
            else:
                self.fail(500, "internal error in the proxy")
        finally:
            self.log_access()

    async def _route(self) -> None:
        target = self.request.target
        if not target.lower().startswith(b"http://"):
            if target.startswith(b"/"):
                self.fail(400, "this is a proxy: send requests in absolute form")
            else:
                self.fail(400, "only http:// URLs can be proxied")
            return
        try:
            self.key = policy.cache_key(target)
        except ValueError as reason:
            self.fail(400, f"cannot proxy this URL: {reason}")
            return
        if self.request.method not in (b"GET", b"HEAD"):
            await self._forward(self._origin_headers(), "method")
            return
        entries = await self._lookup()
        now = self.proxy.reactor.seconds()
        verdict = policy.decide(
            self.request, entries, now, heuristic_cap=self.proxy.config.heuristic_cap
        )
        if verdict.action is policy.Action.SERVE and verdict.entry is not None:
            if await self._serve_stored(verdict.entry, "TCP_HIT", b"hit"):
                return
        elif verdict.action is policy.Action.GATEWAY_TIMEOUT:
            self.fail(504, "only-if-cached: the response is not in the cache")
            return
        elif verdict.action is policy.Action.REVALIDATE and verdict.entry is not None:
            await self._revalidate(verdict.entry, verdict)
            return
        await self._forward(self._origin_headers(), "vary-miss" if entries else "miss")

    async def _lookup(self) -> list[Entry]:
        """The stored variants for this URL; a store error is logged and is a miss."""
        try:
            return await self.proxy.in_thread(self.proxy.store.lookup, self.key)
        except Exception:
            log.failure("store lookup failed for {key}", key=self.key)
            return []

    # -- serving from the store ----------------------------------------------------

    async def _serve_stored(self, entry: Entry, code: str, status: bytes) -> bool:
        """Send a stored response; False if its body has gone (evicted meanwhile)."""
        try:
            body = await self.proxy.in_thread(self.proxy.store.open_body, entry)
        except Exception:
            log.failure("store read failed for {key}", key=self.key)
            body = None
        if body is None:
            return False
        self.code = code
        now = self.proxy.reactor.seconds()
        response = entry.response
        headers = with_header(
            response.headers, b"Age", policy.age_header_value(entry, now)
        ) + self._proxy_headers(status)
        self.content_type = header_value(response.headers, b"content-type")
        self.writer.start(response.status, response.reason, headers, entry.body_length)
        try:
            if self.request.method != b"HEAD" and entry.body_length:
                sender = FileSender()
                sender.CHUNK_SIZE = 1 << 16
                await sender.beginFileTransfer(body, self.writer)
        except Exception:
            # The client went away mid-body; nothing else to do.
            self.writer.abort()
            return True
        finally:
            body.close()
        self.writer.finish()
        return True

    # -- revalidation --------------------------------------------------------------

    async def _revalidate(self, entry: Entry, verdict: policy.Verdict) -> None:
        """Ask the origin whether ``entry`` is still good (RFC 9111 section 4.3)."""
        fwd = "stale" if verdict.stale else "request"
        conditional = policy.conditional_headers([entry])
        headers = self._origin_headers(conditional)
        request_time = self.proxy.reactor.seconds()
        response = await self._request(headers)
        if response is None:
            return
        response_time = self.proxy.reactor.seconds()
        if response.code != 304:
            self.code = "TCP_REFRESH_MODIFIED"
            await self._relay(response, fwd, (request_time, response_time))
            return
        head304 = self._response_head(response)
        await _discard_body(response)
        if not policy.validators_match(entry.response, head304):
            # RFC 9111 section 4.3.4: a 304 that matches nothing is not merged.
            self.code = "TCP_REFRESH_MODIFIED"
            await self._forward(self._origin_headers(), fwd)
            return
        updated = dataclasses.replace(
            entry,
            response=policy.updated_response(entry.response, head304),
            request_time=request_time,
            response_time=response_time,
        )
        try:
            await self.proxy.in_thread(self.proxy.store.update, updated)
        except Exception:
            log.failure("store update failed for {key}", key=self.key)
        status = b"fwd=%s; fwd-status=304" % fwd.encode()
        if not await self._serve_stored(updated, "TCP_REFRESH_UNMODIFIED", status):
            await self._forward(self._origin_headers(), "miss")

    # -- fetching ------------------------------------------------------------------

    async def _forward(self, headers: Headers, fwd: str) -> None:
        """Send the request to the origin and relay the response."""
        request_time = self.proxy.reactor.seconds()
        response = await self._request(headers)
        if response is not None:
            response_time = self.proxy.reactor.seconds()
            await self._relay(response, fwd, (request_time, response_time))

    async def _request(self, headers: Headers) -> IResponse | None:
        """The origin's response head, or None after answering the client an error."""
        host = self._host()
        self.hierarchy = f"HIER_DIRECT/{host}"
        try:
            return await self.proxy.origin.request(
                self.request.method, self.request.target, headers, self.body
            )
        except (OriginTimeout, error.TimeoutError, defer.TimeoutError):
            self.fail(504, f"the origin {host} did not answer in time")
        except error.DNSLookupError:
            self.fail(502, f"cannot resolve the origin's host name {host}")
        except error.ConnectError as reason:
            self.fail(
                502, f"cannot connect to the origin {host}: {reason.osError or reason}"
            )
        except Exception as reason:
            log.info("origin {host} failed: {reason!r}", host=host, reason=reason)
            self.fail(
                502, f"the origin {host} closed the connection without a response"
            )
        return None

    async def _relay(
        self,
        response: IResponse,
        fwd: str,
        times: tuple[float, float],
    ) -> None:
        """Stream the origin's response to the client and, if storable, to the store.

        ``times`` are the request and response times (RFC 9111 section 4.2.3).
        """
        head = self._response_head(response)
        length = self._length(response)
        if policy.is_invalidating(self.request.method, head.status):
            await self._invalidate(head)
        sink = self._store_writer(head, length)
        status = b"fwd=" + fwd.encode()
        if sink is not None:
            status += b"; stored"
        self.content_type = header_value(head.headers, b"content-type")
        self.writer.start(
            head.status, head.reason, head.headers + self._proxy_headers(status), length
        )
        receiver = _OriginBody(
            self.writer, sink, length, self.proxy.config.max_object_size
        )
        response.deliverBody(receiver)
        complete = await receiver.done
        if sink is not None:
            whole = complete and (length is None or sink.size == length)
            await self._commit(sink, whole and not receiver.oversize, head, times)
        if complete:
            # The last bytes go out only now, so a client that asks again as soon
            # as it has the whole body finds it stored.
            receiver.release()
            self.writer.finish()
        else:
            self.code = "NONE_NONE" if not self.writer.connected else self.code
            self.writer.abort()

    async def _commit(
        self,
        sink: BodyWriter,
        whole: bool,
        head: ResponseHead,
        times: tuple[float, float],
    ) -> None:
        """Make a completely received body visible in the store, or discard it."""
        if not whole:
            sink.abort()
            return
        entry = Entry(
            key=self.key,
            url=self.request.target.decode("latin-1"),
            response=dataclasses.replace(head, headers=policy.stored_headers(head)),
            request_time=times[0],
            response_time=times[1],
            vary=policy.vary_values(policy.vary_names(head) or (), self.request),
        )
        try:
            await self.proxy.in_thread(sink.commit, entry)
        except Exception:
            log.failure("storing {url} failed", url=entry.url)
            sink.abort()

    def _store_writer(
        self, head: ResponseHead, length: int | None
    ) -> BodyWriter | None:
        """A writer for the body if this response may be stored, else None."""
        if self.request.method != b"GET" or not policy.is_storable(self.request, head):
            return None
        if length is not None and length > self.proxy.config.max_object_size:
            return None
        try:
            return self.proxy.store.begin(self.key)
        except Exception:
            log.failure("cannot start storing {key}", key=self.key)
            return None

    async def _invalidate(self, head: ResponseHead) -> None:
        """Drop stored responses an unsafe request changed (RFC 9111 section 4.4)."""
        for key in policy.invalidated_keys(self.request.target, head):
            try:
                await self.proxy.in_thread(self.proxy.store.invalidate, key)
            except Exception:
                log.failure("invalidating {key} failed", key=key)

    # -- helpers -------------------------------------------------------------------

    def _response_head(self, response: IResponse) -> ResponseHead:
        """The origin's response head, end-to-end fields only, with a Date."""
        raw: list[tuple[bytes, bytes]] = []
        for name, values in response.headers.getAllRawHeaders():
            raw.extend((name, value) for value in values)
        headers = without_headers(policy.end_to_end(tuple(raw)), _FRAMING)
        if header_value(headers, b"date") is None:
            # RFC 9110 section 6.6.1: a cache or forwarder adds a missing Date.
            now = self.proxy.reactor.seconds()
            headers += ((b"Date", formatdate(now, usegmt=True).encode("ascii")),)
        return ResponseHead(response.code, response.phrase, headers)

    def _length(self, response: IResponse) -> int | None:
        """The body length to announce to the client, None if unknown."""
        if self.request.method == b"HEAD":
            # Agent leaves Content-Length in place for HEAD (no body follows).
            declared = response.headers.getRawHeaders(b"content-length")
            if declared and declared[0].isdigit():
                return int(declared[0])
            return None
        if response.length is UNKNOWN_LENGTH:
            return None
        return int(response.length)

    def _origin_headers(self, conditional: Headers = ()) -> Headers:
        """The request fields sent to the origin (RFC 9110 section 7.6)."""
        drop = _NOT_FORWARDED | (_CONDITIONALS if conditional else frozenset())
        headers = without_headers(policy.end_to_end(self.request.headers), drop)
        return headers + conditional + ((b"Via", self.proxy.via),)

    def _proxy_headers(self, cache_status: bytes) -> Headers:
        """``Via`` and ``Cache-Status`` (RFC 9211) for a response to the client."""
        return (
            (b"Via", self.proxy.via),
            (b"Cache-Status", b"cacheproxy; " + cache_status),
        )

    def _host(self) -> str:
        """The origin's host (and port, when not the default) from the cache key."""
        return self.key.split("/")[2] if self.key.count("/") >= 2 else "-"

    def fail(self, status: int, message: str) -> None:
        """Answer with an error of the proxy's own."""
        self.code = "NONE_NONE" if status != 403 else "TCP_DENIED"
        log.info(
            "{client} {method} {url}: {status} {message}",
            client=self.client,
            method=self.request.method.decode("latin-1"),
            url=self.request.target[:200].decode("latin-1"),
            status=status,
            message=message,
        )
        self.content_type = b"text/plain"
        self.writer.error(status, message, ((b"Via", self.proxy.via),))

    def log_access(self) -> None:
        """Queue this exchange's access-log line."""
        now = self.proxy.reactor.seconds()
        self.proxy.access_log.write(
            squid_line(
                now=now,
                elapsed=now - self.started,
                client=self.client,
                code=self.code,
                status=self.writer.status,
                size=self.writer.bytes_sent,
                method=self.request.method,
                url=self.request.target,
                hierarchy=self.hierarchy,
                content_type=self.content_type,
            )
        )


class _OriginBody(Protocol):
    """Receives an origin's body and tees it to the client and to a store writer.

    When the body is being stored and its length is known, the chunk that completes it
    is held back until L{release}: a client that asks again as soon as it has the
    whole body then finds it stored.  (Without a known length, the client cannot see
    the end before L{ResponseWriter.finish} anyway.)

    @ivar done: fires with True when the body ended complete, False when truncated.
    @ivar received: body bytes received so far.
    @ivar oversize: the body outgrew the size limit for storing.
    """

    def __init__(
        self,
        client: ResponseWriter,
        sink: BodyWriter | None,
        length: int | None,
        limit: int,
    ):
        self._client = client
        self._sink = sink
        self._length = length
        self._limit = limit
        self.received = 0
        self.oversize = False
        self._held = b""
        self.done: defer.Deferred[bool] = defer.Deferred()

    def release(self) -> None:
        """Send the chunk held back while the body was being stored."""
        held, self._held = self._held, b""
        self._client.write(held)

    def connectionMade(self) -> None:
        # Backpressure: a client that reads slowly pauses reading from the origin.
        self._client.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        sink = self._sink
        if sink is None or self._length is None or self.received < self._length:
            self._client.write(data)
        else:
            self._held += data
        if sink is None or self.oversize:
            return
        if sink.size + len(data) > self._limit:
            self.oversize = True
            return
        try:
            sink.write(data)
        except OSError:
            log.failure("cannot write a body to the store")
            self.oversize = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._client.unregisterProducer()
        self.done.callback(bool(reason.check(ResponseDone, PotentialDataLoss)))


async def _discard_body(response: IResponse) -> None:
    """Read and drop a body (a 304 has none, but Agent wants it consumed)."""
    done: defer.Deferred[None] = defer.Deferred()

    class _Drop(Protocol):
        def connectionLost(self, reason: Failure = connectionDone) -> None:
            done.callback(None)

    response.deliverBody(_Drop())
    await done
