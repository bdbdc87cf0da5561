"""Request collapsing: identical misses wait for one origin fetch and share it.

Rules of this module:
- A *flight* is one origin fetch for a URL that other requests may join.  Whether
  they may is decided by the fetch's leader once the response head is known: only
  a response a shared cache may store (RFC 9111 section 3) is shared, so collapsing
  never hands out what caching would not; anything else, or a failure, sends each
  waiting request to the origin on its own.
- Followers stream the body from the file the leader writes to the store, each at
  its own pace: no follower holds the leader back, and no body sits in memory.
- A follower finishes only once the leader committed the body whole; a broken
  body ends every follower's response broken (the connection closes), never short.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from cacheproxy.model import ResponseHead


@dataclass(frozen=True)
class Shared:
    """What the leader shares: the head, the declared length, the growing file.

    @ivar vary: the request's values of the response's Vary fields; a follower
        joins only with the same values (RFC 9111 section 4.1).
    """

    head: ResponseHead
    length: int | None
    path: str
    vary: tuple[tuple[bytes, bytes | None], ...]


class Flight:
    """One origin fetch that followers may join.

    @ivar size: body bytes written to the file so far.
    @ivar finished: the fetch ended; C{complete} says whether the body is whole.
    """

    def __init__(self) -> None:
        self._decided = False
        self._shared: Shared | None = None
        self._waiting: list[defer.Deferred[Shared | None]] = []
        self.size = 0
        self.finished = False
        self.complete = False
        self.followers = 0
        self._listeners: list[Callable[[], None]] = []

    def ready(self) -> defer.Deferred[Shared | None]:
        """Fires with L{Shared}, or None when the follower must fetch alone.

        A Deferred of its own for each follower: one Deferred awaited by several
        would hand its result to the first only.
        """
        if self._decided:
            return defer.succeed(self._shared)
        waiter: defer.Deferred[Shared | None] = defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    def share(self, shared: Shared) -> None:
        """The response may be shared."""
        self._decide(shared)

    def refuse(self) -> None:
        """Followers must go to the origin on their own."""
        self._decide(None)

    def _decide(self, shared: Shared | None) -> None:
        if self._decided:
            return
        self._decided, self._shared = True, shared
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(shared)

    def progress(self, size: int) -> None:
        """``size`` body bytes are in the file now."""
        self.size = size
        self._notify()

    def finish(self, complete: bool) -> None:
        """The fetch ended, whole or broken."""
        self.refuse()
        if not self.finished:
            self.finished, self.complete = True, complete
            self._notify()

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` once, at the next progress or the end."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()


@implementer(IPushProducer)
class Tail:
    """Sends a growing body file to a consumer, waiting for the flight as needed.

    A push producer: it writes while the consumer has room and, once it has sent
    all the file holds, waits for the flight's next progress.  (As a pull producer
    it was asked for data over and over while caught up on a TLS connection, whose
    transport drives pull producers in a loop until they write.)
    """

    CHUNK = 1 << 16

    def __init__(self, file: IO[bytes], flight: Flight, consumer: Any) -> None:
        self._file = file
        self._flight = flight
        self._consumer = consumer
        self._sent = 0
        self._paused = False
        self._waiting = False
        self.done: defer.Deferred[bool] = defer.Deferred()

    def start(self) -> defer.Deferred[bool]:
        """Begin; ``done`` fires True when the whole body was sent, else False."""
        if not self._consumer.connected:
            self._end(False)
        else:
            self._consumer.registerProducer(self, True)
            self._send()
        return self.done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._send()

    def stopProducing(self) -> None:
        self._end(False)

    def _send(self) -> None:
        """Write what the file holds until the consumer pauses us (each write of a
        full chunk fills its buffer soon), then wait for the flight."""
        while not self._paused and not self.done.called:
            data = self._file.read(self.CHUNK)
            if data:
                self._sent += len(data)
                self._consumer.write(data)
                continue
            flight = self._flight
            if flight.finished:
                self._end(flight.complete and self._sent == flight.size)
            elif not self._waiting:
                self._waiting = True
                flight.listen(self._more)
            return

    def _more(self) -> None:
        self._waiting = False
        self._send()

    def _end(self, whole: bool) -> None:
        if self.done.called:
            return
        self._file.close()
        if self._consumer.connected:
            self._consumer.unregisterProducer()
        self.done.callback(whole)
