"""One proxied request: look up, serve a hit, revalidate, or fetch and store.

Rules of this module:
- Every request gets exactly one response or one error, never both; an exception in one
  exchange is logged and answered ``500`` (or the connection closed if the response had
  begun) and never reaches another exchange.
- The origin's body is teed as it arrives (L{cacheproxy.relay.OriginBody}): to the
  client (the origin transport is the client transport's producer, so a slow client
  slows the origin) and into a store writer, which is committed only if the body
  arrived complete.
- The state shared by all exchanges lives in L{cacheproxy.proxy.Proxy}.
- RFC 9111 decisions come from L{cacheproxy.policy}; this module only applies them.
- Store calls that touch SQLite run in the store's thread pool, never on the reactor.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from collections.abc import Sequence
from email.utils import formatdate
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from cacheproxy import pages, policy
from cacheproxy.accesslog import combined_line, squid_line
from cacheproxy.ca import CAError
from cacheproxy.collapse import Flight, Shared, Tail
from cacheproxy.intercept import Interceptor, describe_tls_failure, matches
from cacheproxy.memory import Hot
from cacheproxy.model import (
    Entry,
    Headers,
    RequestHead,
    ResponseHead,
    header_list,
    header_value,
    is_loopback,
    with_header,
    without_headers,
)
from cacheproxy.origin import OriginTimeout, response_fields
from cacheproxy.relay import OriginBody, PieceSender, discard_body, plan_body
from cacheproxy.server import RequestBody, ResponseWriter, discarding_writer
from cacheproxy.store import BodyWriter
from cacheproxy.tunnel import Tunnel, parse_authority

if TYPE_CHECKING:
    from cacheproxy.proxy import Proxy
    from cacheproxy.server import ProxyProtocol

log = Logger()

# Fields of the client's request that the proxy does not pass on: Host is rebuilt from
# the absolute target (RFC 9112 section 3.2.2), Expect is answered by the proxy itself,
# and the origin client frames the body it sends (Content-Length or chunked) itself.
_NOT_FORWARDED = frozenset({b"host", b"expect", b"content-length"})
# The client's validators, replaced by the stored response's when revalidating.
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since"})
# Framing fields: the proxy frames every message it sends itself.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_AGE = frozenset({b"age"})
_HOT_METHODS = frozenset({b"GET", b"HEAD"})
# Request fields that take a request off the hot path: those that change the
# cache's decision, and Via (loop detection).
_NOT_HOT = policy.PLAIN_EXCLUDED | {b"via"}
_CACHE_STATUS = frozenset({b"cache-status"})
# A revalidation asks for the whole representation, whatever part the client wants.
_RANGE = frozenset({b"range", b"if-range"})
# What --record keeps although RFC 9111 would not (complete answers a demo replays).
_RECORDED_STATUSES = frozenset({200, 203, 204, 301, 308, 404, 410})
# The errors stale-if-error covers (RFC 5861 section 4).
_SERVER_ERRORS = frozenset({500, 502, 503, 504})
# The Cache-Status detail of the proxy's own errors, by status (Exchange.fail).
_ERROR_DETAILS = {
    400: "bad-request",
    403: "denied",
    405: "method-not-allowed",
    500: "internal-error",
    502: "origin-error",
    504: "origin-timeout",
    508: "loop",
}


class OriginUnreachable(Exception):
    """No response came from the origin; carries the status the client should get."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Exchange:
    """One request from a client and the response it gets.

    @ivar code: the Squid result code for the access log (``TCP_HIT``, ``TCP_MISS``...).
    @ivar hierarchy: Squid's hierarchy field (``HIER_DIRECT/host`` when fetched).
    @ivar background: a revalidation with no client waiting: nothing is sent or
        logged, only the store is updated.
    """

    def __init__(
        self,
        proxy: Proxy,
        request: RequestHead,
        body: RequestBody,
        writer: ResponseWriter,
        client: str,
        local: tuple[str, int] = ("", 0),
        *,
        secure: bool = False,
    ) -> None:
        self.proxy = proxy
        self.secure = secure
        self.request = request
        self.body = body
        self.writer = writer
        self.client = client
        self.local = local
        self.started = proxy.reactor.seconds()
        self.key = ""
        # Why the request went to the origin (RFC 9211 fwd), once it did.
        self.fwd = ""
        self.background = False
        self.recording = False
        self.flight: Flight | None = None
        self.code = "TCP_MISS"
        self.hierarchy = "HIER_NONE/-"
        self.content_type: bytes | None = None

    async def run(self) -> None:
        """Answer the request, whatever happens, and log it."""
        self.proxy.exchange_started()
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
            self.proxy.exchange_ended()

    def serve_hot(self) -> bool:
        """The hot path: a plain GET or HEAD whose fresh response is whole in the
        memory tier is answered here and now, with no coroutine and no thread;
        False, having sent nothing, for anything else (L{run} then answers).

        It answers as L{run} would: it makes the same checks or declines, and
        L{policy.plain_reuse} gives L{policy.decide}'s verdict for a plain request.
        """
        request = self.request
        proxy = self.proxy
        if (
            request.method not in _HOT_METHODS
            or self.body.present
            or proxy.config.offline
            or not proxy.memory.enabled
            or not self._is_proxied_url(request.target)
            or not proxy.allows(self.client)
        ):
            return False
        for name, _ in request.headers:
            if name.lower() in _NOT_HOT:
                return False
        try:
            key = policy.cache_key(request.target)
        except ValueError:
            return False
        now = proxy.reactor.seconds()
        found = proxy.memory.last_snapshot(key, now)
        if found is None or not found[1] or self._is_own_address(*_host_port(key)):
            return False
        hot = self._hot_variant(found[0])
        if hot is None or now >= hot.reuse.fresh_until:
            return False
        self.key = key
        self.code = "TCP_MEM_HIT"
        self.content_type = hot.content_type
        response = hot.entry.response
        age = policy.age_field(hot.reuse.initial_age + now - hot.entry.response_time)
        self.writer.start(
            response.status,
            response.reason,
            ((b"Age", age),) + self._proxy_headers(b"hit"),
            len(hot.body),
            block=hot.block,
            hold=True,
        )
        self.writer.write(hot.body)
        self.writer.finish()
        self.log_access()
        return True

    def _hot_variant(self, entries: Sequence[Entry]) -> Hot | None:
        """The variant L{policy.select_variant} would pick, if it is a 200 whose
        body is kept, and every variant is an ordinary (not recorded) one."""
        best: Hot | None = None
        for entry in entries:
            hot = self.proxy.memory.hot(entry)
            if hot is None or entry.recorded:
                return None
            if hot.reuse.vary is None or (
                entry.vary
                and policy.vary_values(tuple(n for n, _ in entry.vary), self.request)
                != entry.vary
            ):
                continue
            if best is None or entry.response_time > best.entry.response_time:
                best = hot
        if best is None or best.entry.response.status != 200:
            return None
        return best

    async def run_tunnel(self, channel: ProxyProtocol, first: bytes) -> None:
        """Splice the client with the CONNECT target; log once the tunnel closes."""
        try:
            opened = await self._open_tunnel(channel, first)
        except Exception:
            log.failure(
                "error opening a tunnel to {target}", target=self.request.target
            )
            channel.tunnel = None
            self.fail(500, "internal error in the proxy")
            opened = False
        if not opened:
            self.log_access()

    async def _open_tunnel(self, channel: ProxyProtocol, first: bytes) -> bool:
        """Check and open the tunnel; False after answering an error."""
        if not self._admitted():
            return False
        try:
            host, port = parse_authority(self.request.target)
        except (ValueError, UnicodeDecodeError):
            self.fail(400, "CONNECT needs host:port")
            return False
        if port not in self.proxy.config.connect_ports:
            self.fail(403, f"CONNECT to port {port} is not allowed")
            return False
        if self._is_own_address(host, port):
            self.fail(508, "forwarding loop: the CONNECT target is this proxy")
            return False
        interceptor = self.proxy.interceptor
        if interceptor is not None and matches(self.proxy.config.intercept, host):
            self._intercept(interceptor, channel, host, port, first)
            return False
        if self.proxy.config.offline:
            self.fail(502, "the proxy is offline: it opens no tunnels")
            return False
        self.hierarchy = self._hierarchy(host)
        tunnel = Tunnel(
            self.proxy.reactor,
            channel.transport_handle,
            self.proxy.config.tunnel_idle_timeout,
            self._tunnel_closed,
        )
        channel.tunnel = tunnel
        try:
            await tunnel.open(
                host,
                port,
                self.proxy.config.origin_timeout,
                first,
                parent=self.proxy.config.upstream,
                via=self.proxy.via,
            )
        except Exception as reason:
            self.proxy.stats.origin_error()
            channel.tunnel = None
            timed_out = isinstance(reason, (error.TimeoutError, defer.TimeoutError))
            status = 504 if timed_out else 502
            self.fail(status, f"cannot connect to {host}:{port}: {reason}")
            return False
        self.code = "TCP_TUNNEL"
        self.writer.status = 200
        tunnel.splice(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return True

    def _intercept(
        self,
        interceptor: Interceptor,
        channel: ProxyProtocol,
        host: str,
        port: int,
        first: bytes,
    ) -> None:
        """Answer the CONNECT ourselves and speak TLS with the client, as ``host``.

        No origin is contacted first (so ``--offline`` replays); the requests inside
        are handled as ``https://host:port`` URLs like any others.
        """
        try:
            creator = interceptor.creator_for(host)
        except (ValueError, CAError, OSError) as reason:
            log.error(
                "cannot make a certificate for {host}: {reason}",
                host=host,
                reason=str(reason),
            )
            self.fail(502, f"cannot make a certificate for {host}")
            return
        self.code = "NONE_NONE"
        self.hierarchy = "HIER_NONE/-"
        authority = host if ":" not in host else f"[{host}]"
        if port != 443:
            authority += f":{port}"
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.writer.status = 200
        self.writer.bytes_sent = len(established)
        channel.start_interception(
            established, creator, b"https://" + authority.encode("ascii"), first
        )

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        if tunnel.established:
            self.writer.bytes_sent = tunnel.up + tunnel.down
            self.log_access()

    def _admitted(self) -> bool:
        """Refuse clients outside ``--allow`` and forwarding loops."""
        if not self.proxy.allows(self.client):
            self.fail(403, f"access denied: {self.client} may not use this proxy")
            return False
        pseudonym = self.proxy.pseudonym.encode("ascii").lower()
        if any(
            pseudonym in via.lower()
            for via in header_list(self.request.headers, b"via")
        ):
            # RFC 9110 section 7.6.3: Via exists to detect such loops.
            self.fail(508, "forwarding loop: the request has passed this proxy before")
            return False
        return True

    def _is_proxied_url(self, target: bytes) -> bool:
        """Whether the target is an absolute URL this exchange may fetch: http://,
        or https:// inside an intercepted CONNECT."""
        scheme = target[:8].lower()
        return scheme.startswith(b"http://") or (self.secure and scheme == b"https://")

    def _is_own_address(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is where this proxy listens (a loop)."""
        here, own_port = self.local
        if port != own_port:
            return False
        names = {here, "localhost", "127.0.0.1", "::1", socket.gethostname()}
        return host.lower().strip("[]") in names

    async def _route(self) -> None:
        if not self._admitted():
            return
        target = self.request.target
        if not self._is_proxied_url(target):
            if target.startswith(b"/") and self.request.method in (b"GET", b"HEAD"):
                await self._serve_page(target)
            elif target.startswith(b"/"):
                self.fail(
                    405,
                    "the proxy's own pages answer GET and HEAD only",
                    ((b"Allow", b"GET, HEAD"),),
                )
            elif target.lower().startswith(b"https://"):
                self.fail(
                    400,
                    "https:// URLs go through CONNECT (see --intercept to cache them)",
                )
            else:
                self.fail(400, "only http:// URLs can be proxied")
            return
        try:
            self.key = policy.cache_key(target)
        except ValueError as reason:
            self.fail(400, f"cannot proxy this URL: {reason}")
            return
        if self._is_own_address(*_host_port(self.key)):
            self.fail(508, "forwarding loop: the URL points at this proxy")
            return
        if self.request.method == b"PURGE":
            await self._purge()
            return
        if self.proxy.config.offline:
            await self._replay()
            return
        if self.request.method in (b"TRACE", b"OPTIONS"):
            await self._forward_limited()
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
            if not await self._serve_stored(verdict.entry, "TCP_HIT", b"hit"):
                # The body was evicted since the lookup.
                await self._forward(self._origin_headers(), "miss")
            return
        if verdict.action is policy.Action.GATEWAY_TIMEOUT:
            self.fail(
                504,
                "only-if-cached: the response is not in the cache",
                detail="only-if-cached",
            )
            return
        elif verdict.action is policy.Action.REVALIDATE and verdict.entry is not None:
            entry = verdict.entry
            if verdict.detail == "stale" and policy.stale_while_revalidate_allows(
                entry, now, self.proxy.config.heuristic_cap
            ):
                status = b"hit; detail=stale-while-revalidate"
                if await self._serve_stored(entry, "TCP_STALE_HIT", status):
                    self._revalidate_behind(entry)
                    return
            await self._revalidate(entry, verdict)
            return
        if entries:
            await self._ask_for_variants(entries)
        else:
            await self._fetch_collapsed()

    # -- collapsing ----------------------------------------------------------------

    def _is_collapsible(self) -> bool:
        """Whether this miss could share another's fetch: a plain GET that asks
        nothing of its own (no credentials, directives, ranges or validators)."""
        request = self.request
        if request.method != b"GET" or self.body.present:
            return False
        if header_value(request.headers, b"authorization") is not None:
            return False
        if header_value(request.headers, b"range") is not None:
            return False
        if policy.has_conditionals(request):
            return False
        cc = policy.cache_control(request.headers)
        if "no-cache" in cc or "no-store" in cc:
            return False
        pragma = header_value(request.headers, b"pragma") or b""
        return b"no-cache" not in pragma.lower()

    async def _fetch_collapsed(self) -> None:
        """Fetch a miss, letting identical misses meanwhile wait and share it."""
        flights = self.proxy.flights
        if self.proxy.is_unshared(self.key) or not self._is_collapsible():
            await self._forward(self._origin_headers(), "miss")
            return
        flight = flights.get(self.key)
        if flight is not None:
            if not await self._follow(flight):
                await self._forward(self._origin_headers(), "miss")
            return
        flight = self.flight = flights[self.key] = Flight()
        try:
            await self._forward(self._origin_headers(), "miss")
        finally:
            flight.finish(False)
            if flights.get(self.key) is flight:
                del flights[self.key]

    async def _follow(self, flight: Flight) -> bool:
        """Serve this request from another's fetch; False if it cannot be shared."""
        flight.followers += 1
        shared = await flight.ready()
        if shared is None:
            return False
        names = tuple(name for name, _ in shared.vary)
        if policy.vary_values(names, self.request) != shared.vary:
            return False
        try:
            body = open(shared.path, "rb")  # noqa: SIM115 (Tail closes it)
        except OSError:
            # The leader committed already; its file has moved into the store.
            return False
        self.code = "TCP_CF_MISS"
        head = shared.head
        self.content_type = header_value(head.headers, b"content-type")
        fields = head.headers + self._proxy_headers(b"fwd=miss; collapsed")
        self.writer.start(head.status, head.reason, fields, shared.length)
        if await Tail(body, flight, self.writer).start():
            self.writer.finish()
        else:
            self.writer.abort()
        return True

    async def _replay(self) -> None:
        """``--offline``: answer from the store, fresh or stale, never the origin.

        The variant the cache key and Vary select, or else the newest stored
        variant of the URL, so that a demo survives a slightly different header.
        """
        entry = None
        if self.request.method in (b"GET", b"HEAD"):
            entries = await self._lookup()
            entry = policy.select_variant(entries, self.request) or max(
                entries, key=lambda e: e.response_time, default=None
            )
        if entry is not None:
            status = b"hit; detail=offline"
            if await self._serve_stored(entry, "TCP_OFFLINE_HIT", status):
                return
        url = self.request.target.decode("latin-1")
        self.fail(
            504,
            f"the proxy is offline and has no stored response for {url}",
            detail="offline",
        )

    async def _serve_page(self, path: bytes) -> None:
        """The proxy's own pages: status, /metrics, /proxy.pac (pages.py)."""
        proxy = self.proxy
        volume, entries = await proxy.store_figures()
        page = pages.render(
            path,
            stats=proxy.stats,
            info=proxy.info,
            now=proxy.reactor.seconds(),
            host_header=header_value(self.request.headers, b"host"),
            local=self.local,
            store_bytes=volume,
            store_entries=entries,
            store_budget=proxy.config.cache_size,
        )
        self.code = "NONE_NONE"
        self.content_type = page.content_type
        fields = ((b"Content-Type", page.content_type),) + page.headers + self._via()
        self.writer.start(page.status, b"", fields, len(page.body))
        self.writer.write(page.body)
        self.writer.finish()

    async def _purge(self) -> None:
        """Squid's PURGE: drop every stored variant of the URL, from loopback only."""
        if not is_loopback(self.client):
            self.fail(403, "PURGE is allowed from the proxy's own host only")
            return
        removed = await self.proxy.in_thread(self.proxy.store.invalidate, self.key)
        self.proxy.memory.forget(self.key)
        self.code = "TCP_MISS"
        status, message = (200, b"purged\n") if removed else (404, b"not in cache\n")
        fields = ((b"Content-Type", b"text/plain"),) + self._via()
        self.writer.start(status, b"", fields, len(message))
        self.writer.write(message)
        self.writer.finish()

    async def _forward_limited(self) -> None:
        """TRACE and OPTIONS obey Max-Forwards (RFC 9110 section 7.6.2)."""
        headers = self._origin_headers()
        value = header_value(self.request.headers, b"max-forwards")
        if value is None or not value.strip().isdigit():
            await self._forward(headers, "method")
            return
        remaining = int(value)
        if remaining > 0:
            headers = with_header(headers, b"Max-Forwards", b"%d" % (remaining - 1))
            await self._forward(headers, "method")
            return
        # The proxy is the final recipient (RFC 9110 sections 9.3.7 and 9.3.8).
        self.code = "NONE_NONE"
        if self.request.method == b"OPTIONS":
            allow = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"
            self.writer.start(200, b"OK", ((b"Allow", allow),) + self._via(), 0)
        else:
            echo = self._trace_echo()
            fields = ((b"Content-Type", b"message/http"),) + self._via()
            self.writer.start(200, b"OK", fields, len(echo))
            self.writer.write(echo)
        self.writer.finish()

    def _trace_echo(self) -> bytes:
        """The request as received, less fields likely to hold secrets (9.3.8)."""
        secret = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
        request = self.request
        lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.version)]
        kept = without_headers(request.headers, secret)
        lines += [b"%s: %s" % field for field in kept]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _via(self) -> Headers:
        return ((b"Via", self.proxy.via),)

    async def _lookup(self) -> list[Entry]:
        """The stored variants for this URL, with the refresh rules' say on their
        freshness; a store error is logged and is a miss.

        A snapshot in the memory tier saves the trip to the store's thread.
        """
        proxy = self.proxy
        found = proxy.memory.last_snapshot(self.key, proxy.reactor.seconds())
        entries: Sequence[Entry]
        if found is None:
            try:
                entries = await proxy.read_variants(self.key)
            except Exception:
                log.failure("store lookup failed for {key}", key=self.key)
                return []
        else:
            entries, fresh = found
            if not fresh:
                # Use what is known and read the store again behind the request:
                # hot URLs then never wait for the store's thread.
                refresh = proxy.read_variants(self.key)
                refresh.addErrback(lambda f: log.failure("store lookup failed", f))
        if not self.proxy.config.offline and any(e.recorded for e in entries):
            # Recorded responses replay offline; online, only what RFC 9111 allows.
            entries = [
                entry
                for entry in entries
                if not entry.recorded
                or policy.is_storable(self.request, entry.response)
            ]
        return list(entries)

    # -- serving from the store ----------------------------------------------------

    async def _serve_stored(
        self, entry: Entry, code: str, status: bytes, *, validated: bool = False
    ) -> bool:
        """Send a stored response; False if its body has gone (evicted meanwhile).

        ``validated``: the origin just confirmed it (fields listed in a qualified
        ``no-cache`` may then be sent, RFC 9111 section 5.2.2.4).
        """
        if self.background:
            return True
        response = entry.response
        age = policy.age_header_value(entry, self.proxy.reactor.seconds())
        extra = ((b"Age", age),) + self._proxy_headers(status)
        if self._answer_conditional(entry, extra):
            self.code = code
            return True
        memory = self.proxy.memory
        body: bytes | BinaryIO | None = memory.body(entry.body_id)
        if body is not None:
            if code == "TCP_HIT":
                code = "TCP_MEM_HIT"
        else:
            body = await self._read_body(entry)
            if body is None:
                return False
        self.code = code
        self.content_type = header_value(response.headers, b"content-type")
        if isinstance(body, bytes) and not validated and self._wants_whole(entry):
            # The hot path: a pre-encoded head and the body, in one write.
            block = memory.header_block(entry)
            self.writer.start(
                response.status,
                response.reason,
                extra,
                len(body),
                block=block,
                hold=True,
            )
            self.writer.write(body)
            self.writer.finish()
            return True
        headers = without_headers(
            policy.served_headers(response, validated=validated), _AGE
        )
        plan = plan_body(self.request, response, headers, entry.body_length)
        self.writer.start(
            plan.status, plan.reason, plan.headers + extra, plan.length, hold=True
        )
        if isinstance(body, bytes):
            if self.request.method != b"HEAD":
                for piece in plan.pieces:
                    if isinstance(piece, bytes):
                        self.writer.write(piece)
                    else:
                        self.writer.write(body[piece[0] : piece[0] + piece[1]])
            self.writer.finish()
            return True
        try:
            if self.request.method != b"HEAD" and plan.pieces:
                await PieceSender(body, plan.pieces).send(self.writer)
        except Exception:
            # The client went away mid-body; nothing else to do.
            self.writer.abort()
            return True
        finally:
            body.close()
        self.writer.finish()
        return True

    def _wants_whole(self, entry: Entry) -> bool:
        """Whether the stored 200 goes out whole, headers as stored (no Range, no
        fields held back by a qualified no-cache)."""
        return (
            entry.response.status == 200
            and header_value(self.request.headers, b"range") is None
            and not policy.fields_needing_validation(entry.response)
        )

    async def _read_body(self, entry: Entry) -> bytes | BinaryIO | None:
        """The stored body: whole bytes when small (and then kept in the memory
        tier), an open file otherwise, None when it has gone."""
        limit = self.proxy.memory.max_item if self.proxy.memory.enabled else -1

        def read() -> bytes | BinaryIO | None:
            body = self.proxy.store.open_body(entry)
            if body is None or entry.body_length > limit:
                return body
            with body:
                return body.read()

        try:
            loaded = await self.proxy.in_thread(read)
        except Exception:
            log.failure("store read failed for {key}", key=self.key)
            return None
        if isinstance(loaded, bytes):
            if len(loaded) != entry.body_length:
                log.warn("stored body of {key} has the wrong length", key=self.key)
                return None
            self.proxy.memory.keep_body(entry.body_id, loaded)
        return loaded

    def _answer_conditional(self, entry: Entry, extra: Headers) -> bool:
        """Answer 304 or 412 from a stored response if the request's preconditions
        say so (RFC 9111 section 4.3.2, RFC 9110 section 13.2.2)."""
        if not policy.has_conditionals(self.request):
            return False
        outcome = policy.evaluate_conditionals(
            self.request, entry.response, received=entry.response_time
        )
        if outcome == 304:
            headers = without_headers(policy.not_modified_headers(entry.response), _AGE)
            self.writer.start(304, b"Not Modified", headers + extra, None)
        elif outcome == 412:
            self.writer.start(412, b"Precondition Failed", extra, 0)
        else:
            return False
        self.writer.finish()
        return True

    # -- revalidation --------------------------------------------------------------

    async def _revalidate(self, entry: Entry, verdict: policy.Verdict) -> None:
        """Ask the origin whether ``entry`` is still good (RFC 9111 section 4.3)."""
        fwd = self.fwd = "stale" if verdict.stale else "request"
        conditional = policy.conditional_headers([entry])
        headers = self._origin_headers(conditional)
        request_time = self.proxy.reactor.seconds()
        try:
            response = await self._send(headers)
        except OriginUnreachable as failure:
            await self._origin_failed(entry, failure, verdict)
            return
        response_time = self.proxy.reactor.seconds()
        if (
            response.code in _SERVER_ERRORS
            and verdict.stale
            and self._may_serve_stale_on_error(entry)
        ):
            await discard_body(response)
            status = b"fwd=stale; fwd-status=%d; detail=stale-if-error" % response.code
            if await self._serve_stored(entry, "TCP_REFRESH_FAIL_OLD", status):
                return
            await self._forward(self._origin_headers(), "miss")
            return
        await self._validated(response, [entry], fwd, (request_time, response_time))

    async def _ask_for_variants(self, entries: list[Entry]) -> None:
        """A Vary miss: let the origin pick among the stored variants by ETag.

        RFC 9111 section 4.3.1: a cache may send the entity tags of all its stored
        responses; a 304 then names the one that suits this request too.
        """
        tagged = [e for e in entries if header_value(e.response.headers, b"etag")]
        if not tagged or policy.has_conditionals(self.request):
            await self._forward(self._origin_headers(), "vary-miss")
            return
        headers = self._origin_headers(policy.conditional_headers(tagged))
        request_time = self.proxy.reactor.seconds()
        self.fwd = "vary-miss"
        response = await self._request(headers)
        if response is not None:
            times = (request_time, self.proxy.reactor.seconds())
            await self._validated(response, tagged, "vary-miss", times)

    async def _validated(
        self,
        response: IResponse,
        candidates: list[Entry],
        fwd: str,
        times: tuple[float, float],
    ) -> None:
        """Act on the origin's answer to a conditional request for ``candidates``.

        A 304 refreshes and serves the stored response its validators identify
        (RFC 9111 sections 4.3.3, 4.3.4); a 304 that identifies none is not merged
        and the response is fetched in full; anything else is relayed.
        """
        if response.code != 304:
            self.code = "TCP_REFRESH_MODIFIED" if fwd != "vary-miss" else "TCP_MISS"
            await self._relay(response, fwd, times)
            return
        head304 = self._response_head(response)
        await discard_body(response)
        matched = [
            entry
            for entry in candidates
            if policy.validators_match(entry.response, head304)
        ]
        if not matched:
            self.code = "TCP_REFRESH_MODIFIED" if fwd != "vary-miss" else "TCP_MISS"
            await self._forward(self._origin_headers(), fwd)
            return
        updated = [
            dataclasses.replace(
                entry,
                response=policy.updated_response(entry.response, head304),
                request_time=times[0],
                response_time=times[1],
            )
            for entry in matched
        ]
        # RFC 9111 section 5.2.1.5: a no-store request leaves the store untouched.
        if "no-store" not in policy.cache_control(self.request.headers):
            for entry in updated:
                try:
                    await self.proxy.in_thread(self.proxy.store.update, entry)
                    self.proxy.memory.forget(self.key)
                except Exception:
                    log.failure("store update failed for {key}", key=self.key)
        status = b"fwd=%s; fwd-status=304" % fwd.encode()
        served = await self._serve_stored(
            updated[0], "TCP_REFRESH_UNMODIFIED", status, validated=True
        )
        if not served:
            await self._forward(self._origin_headers(), "miss")

    def _may_serve_stale_on_error(self, entry: Entry) -> bool:
        """Whether stale-if-error lets ``entry`` answer for a failed origin."""
        return policy.can_serve_stale_on_error(
            entry,
            self.request,
            self.proxy.reactor.seconds(),
            heuristic_cap=self.proxy.config.heuristic_cap,
        )

    async def _origin_failed(
        self, entry: Entry, failure: OriginUnreachable, verdict: policy.Verdict
    ) -> None:
        """Revalidation found no origin: serve ``entry`` stale if allowed, else fail.

        RFC 9111 section 4.2.4 lets a disconnected cache serve a stale response,
        when staleness was the only reason to ask; section 5.2.2.2 (must-revalidate,
        and proxy-revalidate and s-maxage with it) makes it answer 504 instead.
        """
        if policy.forbids_stale(entry.response):
            self.fail(
                504,
                f"{failure.message}; the stored response must be revalidated",
                detail="must-revalidate",
            )
            self.code = "TCP_REFRESH_FAIL_ERR"
            return
        if self._may_serve_stale_on_error(entry):
            detail = b"stale-if-error"
        elif verdict.detail == "stale":
            detail = b"disconnected"
        else:
            self.fail(failure.status, failure.message)
            return
        status = b"fwd=stale; detail=" + detail
        if not await self._serve_stored(entry, "TCP_REFRESH_FAIL_OLD", status):
            self.fail(failure.status, failure.message)

    def _revalidate_behind(self, entry: Entry) -> None:
        """Revalidate ``entry`` behind the client, once at a time (RFC 5861 sec. 3)."""
        revalidating = self.proxy.revalidating
        if entry.body_id in revalidating:
            return
        revalidating.add(entry.body_id)
        request = dataclasses.replace(self.request, method=b"GET")
        behind = Exchange(
            self.proxy,
            request,
            RequestBody(None, False),
            discarding_writer(request),
            "-",
        )
        behind.key = self.key
        behind.background = True
        done = defer.ensureDeferred(
            behind._revalidate(
                entry, policy.Verdict(policy.Action.REVALIDATE, entry, True)
            )
        )
        done.addErrback(lambda f: log.failure("background revalidation failed", f))
        done.addBoth(lambda _: revalidating.discard(entry.body_id))

    # -- fetching ------------------------------------------------------------------

    async def _forward(self, headers: Headers, fwd: str) -> None:
        """Send the request to the origin and relay the response."""
        self.fwd = fwd
        request_time = self.proxy.reactor.seconds()
        response = await self._request(headers)
        if response is not None:
            response_time = self.proxy.reactor.seconds()
            await self._relay(response, fwd, (request_time, response_time))

    async def _request(self, headers: Headers) -> IResponse | None:
        """The origin's response head, or None after answering the client an error."""
        try:
            return await self._send(headers)
        except OriginUnreachable as failure:
            self.fail(failure.status, failure.message)
            return None

    async def _send(self, headers: Headers) -> IResponse:
        """The origin's response head; L{OriginUnreachable} if there is none."""
        try:
            return await self._send_once(headers)
        except OriginUnreachable:
            self.proxy.stats.origin_error()
            raise

    async def _send_once(self, headers: Headers) -> IResponse:
        host = self._host()
        self.hierarchy = self._hierarchy(host)
        try:
            return await self.proxy.origin.request(
                self.request.method, self.request.target, headers, self.body
            )
        except (OriginTimeout, error.TimeoutError, defer.TimeoutError):
            raise OriginUnreachable(
                504, f"the origin {host} did not answer in time"
            ) from None
        except error.DNSLookupError:
            raise OriginUnreachable(
                502, f"cannot resolve the origin's host name {host}"
            ) from None
        except error.ConnectError as reason:
            raise OriginUnreachable(
                502, f"cannot connect to the origin {host}: {reason.osError or reason}"
            ) from None
        except Exception as reason:
            refused = describe_tls_failure(reason)
            if refused is not None:
                log.warn("origin {host}: {refused}", host=host, refused=refused)
                raise OriginUnreachable(502, f"{host}: {refused}") from None
            log.info("origin {host} failed: {reason!r}", host=host, reason=reason)
            raise OriginUnreachable(
                502, f"the origin {host} closed the connection without a response"
            ) from None

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
        elif self.request.method == b"HEAD" and head.status == 200:
            await self._freshen_with_head(head, length, times)
        sink = self._store_writer(head, length)
        shareable = sink is not None and not self.recording
        flight = self.flight
        if flight is not None:
            if shareable and sink is not None:
                vary = policy.vary_values(policy.vary_names(head) or (), self.request)
                flight.share(Shared(head, length, sink.path, vary))
            else:
                # Not for a shared cache (RFC 9111 section 3): never for others.
                flight.refuse()
        if not shareable and self.request.method == b"GET":
            self.proxy.mark_unshared(self.key)
        elif self.key in self.proxy.unshared:
            self.proxy.unshared.pop(self.key, None)
        status = b"fwd=" + fwd.encode()
        if sink is not None:
            status += b"; stored"
        self.content_type = header_value(head.headers, b"content-type")
        # With a known length, the head waits for the first piece of body so that
        # a small response reaches the client in one write; a body of unknown
        # length (a stream) gets its head at once.
        self.writer.start(
            head.status,
            head.reason,
            head.headers + self._proxy_headers(status),
            length,
            hold=length is not None,
        )
        memory = self.proxy.memory
        receiver = OriginBody(
            self.writer,
            sink,
            length,
            self.proxy.config.max_object_size,
            memory.max_item if memory.enabled else -1,
            flight,
            self.proxy.store_health,
        )
        response.deliverBody(receiver)
        complete = await receiver.done
        if sink is not None:
            whole = complete and (length is None or sink.size == length)
            stored = await self._commit(
                sink, whole and not receiver.oversize, head, times, receiver.small()
            )
            if flight is not None:
                flight.finish(stored)
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
        small: bytes | None = None,
    ) -> bool:
        """Make a completely received body visible in the store, or discard it.

        ``small``: the whole body when it is small enough for the memory tier.
        Returns whether the body is stored.
        """
        if not whole:
            sink.abort()
            return False
        entry = Entry(
            key=self.key,
            url=self.request.target.decode("latin-1"),
            response=dataclasses.replace(
                head,
                # Caches upstream told how they handled the request that filled
                # this entry; a later hit is another story (RFC 9211).
                headers=without_headers(policy.stored_headers(head), _CACHE_STATUS),
            ),
            request_time=times[0],
            response_time=times[1],
            vary=policy.vary_values(policy.vary_names(head) or (), self.request),
            recorded=self.recording,
        )
        try:
            stored = await self.proxy.in_thread(sink.commit, entry)
        except OSError as error:
            self.proxy.store_health.failed("committing a body", error)
            sink.abort()
            return False
        except Exception:
            log.failure("storing {url} failed", url=entry.url)
            sink.abort()
            return False
        self.proxy.store_health.succeeded()
        self.proxy.memory.forget(self.key)
        if small is not None:
            self.proxy.memory.keep_body(stored.body_id, small)
        return True

    def _store_writer(
        self, head: ResponseHead, length: int | None
    ) -> BodyWriter | None:
        """A writer for the body if this response may be stored, else None.

        With ``--record``, responses RFC 9111 would not store are kept too, marked
        as recorded, so that ``--offline`` can replay them.
        """
        if self.request.method != b"GET":
            return None
        if not policy.is_storable(self.request, head):
            if not (self.proxy.config.record and head.status in _RECORDED_STATUSES):
                return None
            self.recording = True
        if length is not None and length > self.proxy.config.max_object_size:
            return None
        try:
            return self.proxy.store.begin(self.key)
        except OSError as error:
            self.proxy.store_health.failed("starting a body", error)
            return None
        except Exception:
            log.failure("cannot start storing {key}", key=self.key)
            return None

    async def _freshen_with_head(
        self, head: ResponseHead, length: int | None, times: tuple[float, float]
    ) -> None:
        """Update or drop the stored GET response a HEAD 200 speaks for.

        RFC 9111 section 4.3.5: matching validators (and Content-Length, if sent)
        update the stored fields; anything else makes the stored response unusable,
        and cacheproxy drops it.
        """
        entry = policy.select_variant(await self._lookup(), self.request)
        if entry is None:
            return
        same_length = length is None or length == entry.body_length
        try:
            if same_length and policy.validators_match(entry.response, head):
                updated = dataclasses.replace(
                    entry,
                    response=policy.updated_response(entry.response, head),
                    request_time=times[0],
                    response_time=times[1],
                )
                await self.proxy.in_thread(self.proxy.store.update, updated)
                self.proxy.memory.forget(self.key)
            else:
                await self.proxy.in_thread(self.proxy.store.invalidate, self.key)
        except Exception:
            log.failure("freshening {key} with HEAD failed", key=self.key)
        self.proxy.memory.forget(self.key)

    async def _invalidate(self, head: ResponseHead) -> None:
        """Drop stored responses an unsafe request changed (RFC 9111 section 4.4)."""
        for key in policy.invalidated_keys(self.request.target, head):
            try:
                await self.proxy.in_thread(self.proxy.store.invalidate, key)
            except Exception:
                log.failure("invalidating {key} failed", key=key)
            self.proxy.memory.forget(key)

    # -- helpers -------------------------------------------------------------------

    def _response_head(self, response: IResponse) -> ResponseHead:
        """The origin's response head, end-to-end fields only, with a Date."""
        headers = without_headers(
            policy.end_to_end(response_fields(response)), _FRAMING
        )
        if header_value(headers, b"date") is None:
            # RFC 9110 section 6.6.1: a cache or forwarder adds a missing Date.
            now = self.proxy.reactor.seconds()
            headers += ((b"Date", formatdate(now, usegmt=True).encode("ascii")),)
        return ResponseHead(response.code, response.phrase, headers)

    def _length(self, response: IResponse) -> int | None:
        """The body length to announce to the client, None if unknown."""
        if self.request.method == b"HEAD":
            # Content-Length stays in the head of a HEAD response (no body follows).
            declared = response.headers.getRawHeaders(b"content-length")
            if declared and declared[0].isdigit():
                return int(declared[0])
            return None
        if response.length is UNKNOWN_LENGTH:
            return None
        return int(response.length)

    def _origin_headers(self, conditional: Headers = ()) -> Headers:
        """The request fields sent to the origin (RFC 9110 section 7.6)."""
        drop = _NOT_FORWARDED | (_CONDITIONALS | _RANGE if conditional else frozenset())
        headers = without_headers(policy.end_to_end(self.request.headers), drop)
        return headers + conditional + ((b"Via", self.proxy.via),)

    def _proxy_headers(self, cache_status: bytes) -> Headers:
        """``Via`` and ``Cache-Status`` (RFC 9211) for a response to the client."""
        return self._via() + ((b"Cache-Status", b"cacheproxy; " + cache_status),)

    def _hierarchy(self, host: str) -> str:
        """Squid's hierarchy field: where the request went."""
        parent = self.proxy.config.upstream
        if parent is not None:
            return f"FIRSTUP_PARENT/{parent[0]}"
        return f"HIER_DIRECT/{host}"

    def _host(self) -> str:
        """The origin's host (and port, when not the default) from the cache key."""
        return self.key.split("/")[2] if self.key.count("/") >= 2 else "-"

    def fail(
        self, status: int, message: str, headers: Headers = (), detail: str = ""
    ) -> None:
        """Answer with an error of the proxy's own.

        An error for a proxied URL carries ``Cache-Status`` too (RFC 9211 section
        2.8 ``detail``: ``detail``, or a word for the status), with ``fwd`` if the
        request had gone to the origin.
        """
        fields = headers + self._via()
        target = self.request.target
        if self.request.method != b"CONNECT" and self._is_proxied_url(target):
            status_text = b"cacheproxy; "
            if self.fwd:
                status_text += b"fwd=" + self.fwd.encode("ascii") + b"; "
            word = detail or _ERROR_DETAILS.get(status, "error")
            fields += ((b"Cache-Status", status_text + b"detail=" + word.encode()),)
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
        self.writer.error(status, message, fields)

    def log_access(self) -> None:
        """Queue this exchange's access-log line."""
        if self.background:
            return
        now = self.proxy.reactor.seconds()
        if self.proxy.config.log_format == "combined":
            line = combined_line(
                now=now,
                client=self.client,
                request=self.request,
                status=self.writer.status,
                size=self.writer.bytes_sent,
            )
        else:
            line = squid_line(
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
        self.proxy.access_log.write(line)
        self.proxy.stats.record(
            now=now,
            code=self.code,
            status=self.writer.status,
            method=self.request.method,
            url=self.request.target,
            host=self._host() if self.key else self.hierarchy.partition("/")[2],
            client=self.client,
            bytes_sent=self.writer.bytes_sent,
            elapsed=now - self.started,
        )


@functools.lru_cache(maxsize=4096)
def _host_port(key: str) -> tuple[str, int]:
    """The host and port of a cache key (an absolute http:// or https:// URL)."""
    url = urlsplit(key)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
