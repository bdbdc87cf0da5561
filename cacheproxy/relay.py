"""Bodies in motion: an origin's body teed to the client and the store, and a
stored body sent whole, as ranges or as multipart/byteranges.

Rules of this module:
- An origin's body reaches the client with backpressure (the origin transport is the
  client's producer) and the store writer sees exactly the same bytes.
- A stored body is planned first (L{plan_body}: status, fields, length, pieces per
  RFC 9110 section 14) and then sent piece by piece (L{PieceSender}).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from cacheproxy import policy
from cacheproxy.collapse import Flight
from cacheproxy.model import (
    Headers,
    RequestHead,
    ResponseHead,
    header_value,
    without_headers,
)
from cacheproxy.server import ResponseWriter
from cacheproxy.store import BodyWriter

if TYPE_CHECKING:
    from cacheproxy.proxy import StoreHealth


# What a stored body is sent as: literal bytes, or (offset, length) of the file.
Piece = bytes | tuple[int, int]


class OriginBody(Protocol):
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
        keep: int = -1,
        flight: Flight | None = None,
        health: StoreHealth | None = None,
    ):
        self._client = client
        self._flight = flight
        self._health = health
        self._sink = sink
        self._length = length
        self._limit = limit
        # Bodies up to ``keep`` bytes are also kept whole, for the memory tier.
        self._keep = keep if sink is not None else -1
        self._kept: list[bytes] | None = [] if self._keep >= 0 else None
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

    def small(self) -> bytes | None:
        """The whole body if it was small enough to keep, else None."""
        return b"".join(self._kept) if self._kept is not None else None

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._kept is not None:
            if self.received <= self._keep:
                self._kept.append(data)
            else:
                self._kept = None
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
            flight = self._flight
            if flight is not None and flight.followers:
                sink.flush()
                flight.progress(sink.size)
        except OSError as error:
            if self._health is not None:
                self._health.failed("writing a body", error)
            self.oversize = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._client.unregisterProducer()
        self.done.callback(bool(reason.check(ResponseDone, PotentialDataLoss)))


async def discard_body(response: IResponse) -> None:
    """Read and drop a body (a 304 has none, but the client wants it consumed)."""
    done: defer.Deferred[None] = defer.Deferred()

    class _Drop(Protocol):
        def connectionLost(self, reason: Failure = connectionDone) -> None:
            done.callback(None)

    response.deliverBody(_Drop())
    await done


@dataclasses.dataclass(frozen=True)
class BodyPlan:
    """How a stored response is sent: status, fields, length and body pieces."""

    status: int
    reason: bytes
    headers: Headers
    length: int
    pieces: tuple[Piece, ...]


def plan_body(
    request: RequestHead, response: ResponseHead, headers: Headers, length: int
) -> BodyPlan:
    """The whole body, or the ranges the request asks for (RFC 9110 section 14)."""
    whole = BodyPlan(response.status, response.reason, headers, length, ((0, length),))
    if response.status != 200 or not policy.if_range_allows(request, response):
        return whole
    ranges = policy.requested_ranges(request, length)
    if ranges is None:
        return whole
    if not ranges:
        unsatisfiable = ((b"Content-Range", b"bytes */%d" % length),)
        return BodyPlan(416, b"Range Not Satisfiable", unsatisfiable, 0, ())
    if len(ranges) == 1:
        (only,) = ranges
        size = only.end - only.start + 1
        fields = headers + ((b"Content-Range", policy.content_range(only, length)),)
        return BodyPlan(206, b"Partial Content", fields, size, ((only.start, size),))
    content_type = header_value(response.headers, b"content-type")
    boundary = policy.multipart_boundary(secrets.token_bytes(12))
    pieces: list[Piece] = []
    for part in ranges:
        pieces.append(policy.multipart_part_head(boundary, content_type, part, length))
        pieces.append((part.start, part.end - part.start + 1))
    pieces.append(policy.multipart_end(boundary))
    fields = without_headers(headers, frozenset({b"content-type"})) + (
        (b"Content-Type", policy.multipart_content_type(boundary)),
    )
    total = policy.multipart_length(boundary, content_type, ranges, length)
    return BodyPlan(206, b"Partial Content", fields, total, tuple(pieces))


@implementer(IPullProducer)
class PieceSender:
    """Sends literal bytes and slices of a stored body file, pulled by the client."""

    CHUNK = 1 << 16

    def __init__(self, body: BinaryIO, pieces: Sequence[Piece]) -> None:
        self._body = body
        self._pieces = list(reversed(pieces))
        self._remaining = 0
        self._consumer: ResponseWriter | None = None
        self._done: defer.Deferred[None] = defer.Deferred()

    def send(self, consumer: ResponseWriter) -> defer.Deferred[None]:
        """Send every piece to ``consumer``; fires when all are written."""
        self._consumer = consumer
        if not consumer.connected:
            self._fail(ConnectionError("the client went away"))
        else:
            consumer.registerProducer(self, False)
        return self._done

    def resumeProducing(self) -> None:
        consumer = self._consumer
        if consumer is None or self._done.called:
            return
        while self._remaining == 0:
            if not self._pieces:
                consumer.unregisterProducer()
                self._done.callback(None)
                return
            piece = self._pieces.pop()
            if isinstance(piece, bytes):
                consumer.write(piece)
                return
            offset, self._remaining = piece
            self._body.seek(offset)
        data = self._body.read(min(self.CHUNK, self._remaining))
        if not data:
            self._fail(OSError("stored body shorter than recorded"))
            return
        self._remaining -= len(data)
        consumer.write(data)

    def stopProducing(self) -> None:
        self._fail(ConnectionError("the client went away"))

    def _fail(self, reason: Exception) -> None:
        if not self._done.called:
            self._done.errback(reason)
