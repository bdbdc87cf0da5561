"""The proxy's own pages: a status page, Prometheus metrics and a PAC file.

Rules of this module:
- Pure: a path and the proxy's figures in, a L{Page} out; no I/O, no clock of its
  own (``now`` is an argument), no Twisted.
- Every value that reaches HTML goes through ``html.escape``; the status page has
  no scripts and no external assets, so it works offline and on a phone.
- The PAC file names the proxy by the address the client used to fetch it (its
  ``Host`` header), falling back to the connection's local address; a ``Host``
  that is not a plain ``host[:port]`` is not trusted, since it lands in JavaScript.
- Unknown paths are a short plain-text ``404``.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cacheproxy.model import Headers
from cacheproxy.stats import Minute, Recent, Stats

_NO_STORE: Headers = ((b"Cache-Control", b"no-store"),)
PAC_TYPE = b"application/x-ns-proxy-autoconfig"
# A host name, an IPv4 literal or a bracketed IPv6 literal, and an optional port.
_AUTHORITY = re.compile(
    rb"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?"
)
_URL_SHOWN = 120
# Options that change what clients get, announced at the top of the status page.
_MODES = ("offline", "record")


@dataclass(frozen=True)
class Page:
    """A complete response of the proxy's own.

    @ivar status: the status code.
    @ivar content_type: the ``Content-Type`` field value.
    @ivar body: the whole body.
    @ivar headers: further header fields.
    """

    status: int
    content_type: bytes
    body: bytes
    headers: Headers = ()


@dataclass(frozen=True)
class ProxyInfo:
    """What the status page says about the proxy itself.

    @ivar pseudonym: the proxy's ``Via`` pseudonym.
    @ivar version: the package version.
    @ivar options: the active options as ``(name, value)`` pairs, in display order.
    """

    pseudonym: str
    version: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _View:
    """Everything the pages read, gathered once per request."""

    stats: Stats
    info: ProxyInfo
    now: float
    host_header: bytes | None
    local: tuple[str, int]
    store_bytes: int
    store_entries: int
    store_budget: int


def render(
    path: bytes,
    *,
    stats: Stats,
    info: ProxyInfo,
    now: float,
    host_header: bytes | None,
    local: tuple[str, int],
    store_bytes: int,
    store_entries: int,
    store_budget: int,
) -> Page:
    """The page at ``path`` (a request target in origin form)."""
    stats.set_store(store_bytes, store_entries, store_budget)
    view = _View(
        stats, info, now, host_header, local, store_bytes, store_entries, store_budget
    )
    page = _ROUTES.get(path.split(b"?", 1)[0])
    return page(view) if page is not None else not_found()


def not_found() -> Page:
    """A short plain-text 404 naming the pages that exist."""
    body = b"not found: this proxy serves /, /metrics and /proxy.pac\n"
    return Page(404, b"text/plain; charset=utf-8", body)


# -- /metrics ------------------------------------------------------------------


def metrics_page(view: _View) -> Page:
    """The Prometheus text exposition of the proxy's registry."""
    body = generate_latest(view.stats.registry)
    return Page(200, CONTENT_TYPE_LATEST.encode("ascii"), body, _NO_STORE)


# -- /proxy.pac ----------------------------------------------------------------

_PAC = """\
function FindProxyForURL(url, host) {
  // Names without a dot and loopback names stay on the LAN.
  if (isPlainHostName(host) || host === "localhost" || dnsDomainIs(host, ".localhost"))
    return "DIRECT";
  if (host === "::1" || host === "[::1]")
    return "DIRECT";
  // Private IPv4 literals only: matching the string first avoids a DNS lookup.
  if (/^\\d{1,3}(\\.\\d{1,3}){3}$/.test(host) &&
      (isInNet(host, "127.0.0.0", "255.0.0.0") ||
       isInNet(host, "10.0.0.0", "255.0.0.0") ||
       isInNet(host, "172.16.0.0", "255.240.0.0") ||
       isInNet(host, "192.168.0.0", "255.255.0.0")))
    return "DIRECT";
  return "PROXY %s; DIRECT";
}
"""


def pac_page(view: _View) -> Page:
    """A proxy auto-config file that sends everything but the LAN through us."""
    body = (_PAC % proxy_address(view.host_header, view.local)).encode("ascii")
    return Page(200, PAC_TYPE, body)


def proxy_address(host_header: bytes | None, local: tuple[str, int]) -> str:
    """``host:port`` clients reach the proxy at: their Host header, else ``local``.

    A Host without a port keeps the name and takes the port of the connection.
    """
    here, port = local
    match = _AUTHORITY.fullmatch(host_header.strip()) if host_header else None
    if match is None:
        host = f"[{here}]" if ":" in here else here
        return f"{host}:{port}"
    named_port = match["port"]
    if named_port is not None and 0 < int(named_port) < 65536:
        port = int(named_port)
    return f"{match['host'].decode('ascii')}:{port}"


# -- / ---------------------------------------------------------------------------

_CSS = """\
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:1em;max-width:60em;\
color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
.sub{color:#666;margin:0}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}
dt{color:#555}dd{margin:0;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.9em;width:100%}
th,td{text-align:left;padding:.2em .5em;border-bottom:1px solid #ddd;\
white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
svg{width:100%;height:auto;background:#fff;border:1px solid #ddd}
.mode{background:#fff3cd;border:1px solid #e0c060;padding:.3em .6em;margin:.5em 0}
.hit{fill:#2e7d32}.miss{fill:#ef6c00}.key{font-size:.85em;color:#555}
"""


def status_page(view: _View) -> Page:
    """The HTML status page."""
    info = view.info
    title = f"cacheproxy {info.pseudonym}"
    sections = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">version {_e(info.version)} &middot; '
        '<a href="/metrics">metrics</a> &middot; '
        '<a href="/proxy.pac">proxy.pac</a></p>',
        _worker(view.stats),
        _modes(info),
        _section("Traffic", _figures(view)),
        _section("Store", _store(view)),
        _section("Hits and misses per minute, last hour", _chart(view)),
        _section("Busiest hosts", _hosts(view.stats)),
        _section("Options", _options(info)),
        _section("Recent requests", _recent(view.stats.recent())),
    ]
    document = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        "<body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    return Page(200, b"text/html; charset=utf-8", document.encode("utf-8"), _NO_STORE)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _section(heading: str, content: str) -> str:
    return f"<section><h2>{_e(heading)}</h2>\n{content}\n</section>"


def _pairs(rows: Iterable[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return f"<dl>{items}</dl>"


def _worker(stats: Stats) -> str:
    """With ``--workers``: which process answered, since the figures are its own."""
    if stats.worker is None:
        return ""
    number, workers, pid = stats.worker
    return (
        f'<p class="sub">answered by worker {number} of {workers} (pid {pid}):'
        " traffic figures are"
        " this worker's own; <code>cacheproxy stats</code> adds up hits and misses"
        " of all workers</p>"
    )


def _modes(info: ProxyInfo) -> str:
    """A banner for the modes that change what clients get: offline, record."""
    on = [
        name
        for name, value in info.options
        if name in _MODES and value.lower() not in ("off", "no", "false", "")
    ]
    return "".join(
        f'<p class="mode">{_e(name)} mode is on{_e(_MODE_NOTES.get(name, ""))}</p>'
        for name in on
    )


_MODE_NOTES = {
    "record": ": responses marked private or no-store are stored too",
    "offline": ": no origin is contacted",
}


def _figures(view: _View) -> str:
    s = view.stats
    return _pairs(
        [
            ("uptime", duration(s.uptime(view.now))),
            ("requests", f"{s.requests}"),
            ("hits / misses", f"{s.hits} / {s.misses}"),
            ("hit ratio (requests)", percent(s.hit_ratio())),
            ("hit ratio (bytes)", percent(s.byte_hit_ratio())),
            ("bytes from cache", size(s.bytes_from_cache)),
            ("bytes fetched", size(s.bytes_fetched)),
            ("bytes tunnelled", size(s.tunnel_bytes)),
            ("origin errors", f"{s.origin_errors}"),
            ("open connections", f"{s.open_connections}"),
        ]
    )


def _store(view: _View) -> str:
    used = view.store_bytes / view.store_budget if view.store_budget > 0 else None
    return _pairs(
        [
            ("size", f"{size(view.store_bytes)} of {size(view.store_budget)}"),
            ("used", percent(used)),
            ("entries", f"{view.store_entries}"),
        ]
    )


def _table(
    headings: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int]
) -> str:
    """An HTML table of escaped cells; columns in ``numeric`` align right."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>\n"
        for row in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>\n{body}</table></div>'


def _hosts(stats: Stats) -> str:
    hosts = stats.top_hosts(10)
    if not hosts:
        return "<p>none yet</p>"
    return _table(("host", "requests"), ((_e(h), _e(n)) for h, n in hosts), {1})


def _options(info: ProxyInfo) -> str:
    if not info.options:
        return "<p>defaults</p>"
    return _pairs(info.options)


def _recent(recent: list[Recent]) -> str:
    if not recent:
        return "<p>none yet</p>"
    rows = (
        (
            _e(time.strftime("%H:%M:%S", time.gmtime(r.time))),
            _e(r.client),
            _e(f"{r.code}/{r.status:03d}"),
            _e(r.method.decode("latin-1")),
            _e(_shorten(r.url.decode("utf-8", "replace"))),
            _e(r.bytes_sent),
        )
        for r in recent
    )
    headings = ("time (UTC)", "client", "result", "method", "URL", "bytes")
    return _table(headings, rows, {5})


def _shorten(text: str) -> str:
    return text if len(text) <= _URL_SHOWN else text[: _URL_SHOWN - 1] + "\u2026"


def _chart(view: _View) -> str:
    """An inline SVG of hits stacked on misses, one bar per minute, oldest left."""
    minutes = view.stats.per_minute(view.now)
    peak = max((m.hits + m.misses for m in minutes), default=0) or 1
    bars = "".join(_bar(i, m, peak) for i, m in enumerate(minutes))
    return (
        '<svg viewBox="0 0 600 130" role="img" '
        f'aria-label="hits and misses per minute, peak {peak}">'
        f"{bars}"
        '<text x="0" y="127" font-size="10">-60 min</text>'
        '<text x="600" y="127" font-size="10" text-anchor="end">now</text>'
        f'<text x="0" y="10" font-size="10">{_e(peak)}/min</text>'
        "</svg>\n"
        '<p class="key"><svg width="10" height="10" style="width:10px;border:0">'
        '<rect class="hit" width="10" height="10"/></svg> hits '
        '<svg width="10" height="10" style="width:10px;border:0">'
        '<rect class="miss" width="10" height="10"/></svg> misses</p>'
    )


def _bar(index: int, minute: Minute, peak: int) -> str:
    """One minute's bar: misses at the bottom, hits above, scaled to ``peak``."""
    if not minute.hits + minute.misses:
        return ""
    top, height = 12.0, 104.0
    miss = height * minute.misses / peak
    hit = height * minute.hits / peak
    x = index * 10 + 1
    base = top + height
    clock = time.strftime("%H:%M", time.gmtime(minute.minute * 60))
    label = _e(f"{clock} UTC: {minute.hits} hits, {minute.misses} misses")
    return (
        f"<g><title>{label}</title>"
        f'<rect class="miss" x="{x}" y="{base - miss:.1f}" width="8" '
        f'height="{miss:.1f}"/>'
        f'<rect class="hit" x="{x}" y="{base - miss - hit:.1f}" width="8" '
        f'height="{hit:.1f}"/></g>'
    )


# -- formatting ----------------------------------------------------------------


def size(count: int) -> str:
    """A byte count in binary units: ``512 B``, ``1.5 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def percent(ratio: float | None) -> str:
    """A ratio as a percentage with one decimal, or ``-`` when undefined."""
    return "-" if ratio is None else f"{ratio * 100:.1f} %"


def duration(seconds: float) -> str:
    """Seconds as ``2d 3h 4m`` (``45s`` under a minute)."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts.append(f"{rest // 60}m")
    return " ".join(parts)


_ROUTES: dict[bytes, Callable[[_View], Page]] = {
    b"/": status_page,
    b"/index.html": status_page,
    b"/metrics": metrics_page,
    b"/proxy.pac": pac_page,
}
