"""The ``cacheproxy`` command: look into, prune, export and warm a proxy's store.

Rules of this module:
- It imports argparse, the store and the pure modules only (no Twisted), so it
  starts fast, and works while a proxy uses the same cache directory: every store
  operation is one short diskcache transaction.
- It is the edge where the clock is read (``now`` for ages and freshness).
- Success prints one line (``ls`` one per entry) on stdout; an error prints
  ``cacheproxy: error: ...`` on stderr and exits 1; a usage error exits 2.
- An existing cache is opened with the settings saved in it, never created,
  except by ``import``.
- A progress indicator goes to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import diskcache

from cacheproxy import __version__
from cacheproxy.ca import (
    CERT_FILE,
    DEFAULT_DIRECTORY,
    CAError,
    fingerprint,
    init_ca,
    load_ca,
)
from cacheproxy.har import (
    NotHar,
    Skipped,
    entry_from_har,
    entry_to_har,
    har_entries,
    har_log,
)
from cacheproxy.model import Config, Entry
from cacheproxy.policy import cache_key, current_age, is_fresh
from cacheproxy.refresh import builtin_rules, with_rules
from cacheproxy.store import Store

PROG = "cacheproxy"
DEFAULT_CACHE_DIR = Config().cache_dir


class CliError(Exception):
    """A failure reported as one line on stderr with exit status 1."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _now() -> float:
    """The wall clock, read here at the command line's edge."""
    return datetime.now(UTC).timestamp()


def _iso(timestamp: float) -> str:
    """``timestamp`` as an ISO 8601 UTC time to the second."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    """A short human duration: ``42s``, ``5m``, ``3h``, ``12d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _open(directory: str) -> Store:
    """The existing store in ``directory``; CliError if there is none."""
    try:
        return Store.open_existing(directory)
    except FileNotFoundError:
        raise CliError(f"{directory} is not a cache directory") from None


def _open_or_create(directory: str) -> Store:
    """The store in ``directory``, created (with the default budget) if absent."""
    if os.path.isdir(directory) and os.listdir(directory):
        return _open(directory)
    return Store(directory, Config().cache_size)


class Progress:
    """``label done/total`` redrawn on stderr, only if stderr is a terminal."""

    INTERVAL = 0.1

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._active = self._stream.isatty()
        self._label = label
        self._total = total
        self._drawn = 0.0

    def step(self, done: int) -> None:
        """Show that ``done`` of the total are finished (at most ten times a second)."""
        if not self._active:
            return
        moment = time.monotonic()
        if moment - self._drawn >= self.INTERVAL or done == self._total:
            self._drawn = moment
            self._stream.write(f"\r{self._label} {done}/{self._total}")
            self._stream.flush()

    def finish(self) -> None:
        """End the indicator's line."""
        if self._active and self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def _state(entry: Entry, now: float) -> tuple[float, bool]:
    """The entry's current age and whether it is fresh under the built-in rules."""
    annotated = with_rules(entry, builtin_rules())
    return current_age(annotated, now), is_fresh(annotated, now)


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _describe(entry: Entry, now: float) -> dict[str, Any]:
    """One stored entry as the JSON object ``ls --json`` prints."""
    age, fresh = _state(entry, now)
    return {
        "url": entry.url,
        "status": entry.response.status,
        "size": entry.body_length,
        "stored": _iso(entry.response_time),
        "age": round(age, 3),
        "fresh": fresh,
        "recorded": entry.recorded,
        "vary": {
            name.decode("latin-1"): None if value is None else value.decode("latin-1")
            for name, value in entry.vary
        },
    }


def cmd_ls(args: argparse.Namespace) -> int:
    """List the stored entries, one line (or JSON object) each."""
    store = _open(args.cache_dir)
    try:
        now = _now()
        entries = sorted(store.entries(), key=lambda e: (e.url, e.response_time))
        described = [_describe(entry, now) for entry in entries]
    finally:
        store.close()
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    if not described:
        print(f"no entries stored in {args.cache_dir}")
        return 0
    width = max(len(str(item["size"])) for item in described)
    for item in described:
        state = "fresh" if item["fresh"] else "stale"
        if item["recorded"]:
            state += ",recorded"
        vary = " ".join(f"{n}={v}" for n, v in item["vary"].items() if v is not None)
        print(
            f"{item['status']} {item['size']:>{width}} {item['stored']}"
            f" {_duration(item['age']):>4} {state:<14} {item['url']}"
            + (f" [{vary}]" if vary else "")
        )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the number of stored URLs, bytes used, the budget and counters."""
    store = _open(args.cache_dir)
    try:
        urls = store.count()
        volume = store.volume()
        budget = store.size_limit()
        counters = store.read_counters()
    finally:
        store.close()
    if args.json:
        report = {"urls": urls, "bytes": volume, "size_limit": budget}
        print(json.dumps({**report, "counters": counters}, indent=2))
        return 0
    percent = 100 * volume / budget if budget else 0.0
    print(f"entries: {urls} URLs")
    print(f"size:    {volume} bytes of {budget} bytes budget ({percent:.1f}%)")
    if counters is None:
        print("hits/misses: not recorded")
        return 0
    hits, misses = counters.get("hit", 0), counters.get("miss", 0)
    ratio = f" (hit ratio {100 * hits / (hits + misses):.1f}%)" if hits + misses else ""
    print(f"hits/misses: {hits}/{misses}{ratio}")
    others = {n: v for n, v in sorted(counters.items()) if n not in ("hit", "miss")}
    if others:
        print("counters: " + ", ".join(f"{n}={v}" for n, v in others.items()))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove every variant of one URL, or everything with ``--all``."""
    if args.all == (args.url is not None):
        raise _UsageError("give either a URL or --all")
    if args.all:
        store = _open(args.cache_dir)
        try:
            removed = store.clear()
        finally:
            store.close()
        print(f"purged all {removed} entries from {args.cache_dir}")
        return 0
    try:
        key = cache_key(args.url.encode("utf-8"))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    store = _open(args.cache_dir)
    try:
        removed = store.invalidate(key)
    finally:
        store.close()
    if not removed:
        raise CliError(f"nothing stored for {args.url}")
    noun = "variant" if removed == 1 else "variants"
    print(f"purged {removed} {noun} of {key}")
    return 0


@contextmanager
def _replacing(path: str) -> Iterator[TextIO]:
    """A text file that becomes ``path`` only when the block completes."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CliError(f"cannot write {path}: {directory} is not a directory")
    fd, temporary = tempfile.mkstemp(prefix=".cacheproxy-", dir=directory)
    try:
        with open(fd, "w", encoding="utf-8") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def cmd_export(args: argparse.Namespace) -> int:
    """Write the stored entries (optionally under a URL prefix) as a HAR file."""
    store = _open(args.cache_dir)
    exported = 0
    try:
        entries = sorted(
            (e for e in store.entries() if e.url.startswith(args.url_prefix or "")),
            key=lambda e: e.request_time,
        )
        progress = Progress("exporting", len(entries))
        head = json.dumps(har_log(__version__, []), indent=1)
        # Streamed one entry at a time, so only one body is held in memory.
        before, _, after = head.partition('"entries": []')
        with _replacing(args.file) as out:
            out.write(before + '"entries": [')
            for done, entry in enumerate(entries, 1):
                body = store.open_body(entry)
                if body is not None:
                    with body:
                        data = body.read()
                    out.write(",\n" if exported else "\n")
                    out.write(json.dumps(entry_to_har(entry, data)))
                    exported += 1
                progress.step(done)
            out.write("\n  ]" + after + "\n")
        progress.finish()
    finally:
        store.close()
    gone = len(entries) - exported
    note = f" ({gone} evicted meanwhile)" if gone else ""
    print(f"exported {exported} entries to {args.file}{note}")
    return 0


def _load_har(path: str) -> list[Any]:
    """The ``log.entries`` of the HAR file at ``path``; CliError if it is not one."""
    try:
        with open(path, "rb") as file:
            document = json.load(file)
    except (ValueError, RecursionError) as exc:
        raise CliError(f"{path} is not valid JSON: {exc}") from None
    try:
        return har_entries(document)
    except NotHar as exc:
        raise CliError(f"{path} is {exc}") from None


def cmd_import(args: argparse.Namespace) -> int:
    """Store each complete GET response of a HAR file as a recorded entry."""
    items = _load_har(args.file)
    skipped: Counter[str] = Counter()
    imported = 0
    store = _open_or_create(args.cache_dir)
    progress = Progress("importing", len(items))
    try:
        for done, item in enumerate(items, 1):
            try:
                entry, body = entry_from_har(item)
            except Skipped as reason:
                skipped[str(reason)] += 1
                continue
            # One commit per entry: an interrupted import leaves whole entries.
            store.put(entry, body)
            imported += 1
            progress.step(done)
        progress.finish()
    finally:
        store.close()
    line = f"imported {imported} entries from {args.file}"
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        line += f"; skipped {skipped.total()}: {reasons}"
    print(line)
    return 0


def _trust_instructions(pem: str, directory: str) -> list[str]:
    """How to make each kind of client trust the CA certificate at ``pem``."""
    q = shlex.quote(pem)
    key = os.path.join(directory, "ca.key")
    system = "/etc/ssl/certs/ca-certificates.crt"
    return [
        "To trust it (only in clients that will use this proxy's --intercept):",
        "  Debian/Ubuntu (system store; the file name must end in .crt):",
        f"    sudo cp {q} /usr/local/share/ca-certificates/cacheproxy.crt",
        "    sudo update-ca-certificates",
        f"  pip:       PIP_CERT={q} pip install ...   or   pip --cert {q} ...",
        f"  npm:       npm config set cafile {q}   (node: NODE_EXTRA_CA_CERTS={q})",
        f"  curl:      curl --cacert {q} ...",
        f"  requests:  REQUESTS_CA_BUNDLE={q}",
        "  browsers:  import it as an authority trusted to identify websites",
        "             (Firefox: Settings > Privacy & Security > View Certificates >"
        " Authorities;",
        "             Chrome: Settings > Privacy and security > Security >"
        " Manage certificates)",
        "  (pip, npm cafile, curl and requests then trust only this CA, so hosts that"
        " are not",
        "  intercepted fail; after update-ca-certificates give them"
        f" {system} instead.)",
        "",
        f"Risk: anyone holding {key} can impersonate any site to clients that trust"
        " this CA",
        "(it has no name constraints, as --intercept may name any host);"
        f" keep {directory} private.",
    ]


def cmd_ca_init(args: argparse.Namespace) -> int:
    """Create the local CA and print its fingerprint and how to trust it."""
    directory = Path(args.ca_dir)
    authority = init_ca(directory, now=datetime.now(UTC), force=args.force)
    pem = os.path.abspath(directory / CERT_FILE)
    expiry = authority.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    print(f"created a CA in {directory}, valid until {expiry}")
    print(f"certificate: {pem}")
    print(f"SHA-256 fingerprint: {fingerprint(authority.certificate)}")
    print()
    print("\n".join(_trust_instructions(pem, str(directory))))
    return 0


def cmd_ca_show(args: argparse.Namespace) -> int:
    """Print the CA's certificate path, name, SHA-256 fingerprint and expiry."""
    directory = Path(args.ca_dir)
    certificate = load_ca(directory).certificate
    expiry = certificate.not_valid_after_utc
    left = (expiry - datetime.now(UTC)).total_seconds()
    state = f"in {_duration(left)}" if left > 0 else "EXPIRED"
    print(f"certificate: {os.path.abspath(directory / CERT_FILE)}")
    print(f"subject: {certificate.subject.rfc4514_string()}")
    print(f"SHA-256 fingerprint: {fingerprint(certificate)}")
    print(f"expires: {expiry.strftime('%Y-%m-%dT%H:%M:%SZ')} ({state})")
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class _UsageError(Exception):
    """A combination of arguments argparse cannot express; exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``cacheproxy`` argument parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and manage a cacheproxy store."
    )
    parser.add_argument("--version", action="version", version=__version__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        metavar="DIR",
        help=f"the proxy's cache directory (default {DEFAULT_CACHE_DIR})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser(
        "ls",
        parents=[common],
        help="stored entries: URL, status, size, age, freshness",
        description="One line per stored entry: status, body size, time stored,"
        " age, fresh or stale (and recorded), URL and the Vary values.",
    )
    ls.add_argument("--json", action="store_true", help="a JSON array for scripts")
    ls.set_defaults(run=cmd_ls)

    purge = commands.add_parser(
        "purge", parents=[common], help="drop one URL (all its variants)"
    )
    purge.add_argument("url", nargs="?", metavar="URL", help="the URL to drop")
    purge.add_argument("--all", action="store_true", help="empty the whole store")
    purge.set_defaults(run=cmd_purge, subparser=purge)

    stats = commands.add_parser("stats", parents=[common], help="counts and sizes")
    stats.add_argument("--json", action="store_true", help="a JSON object")
    stats.set_defaults(run=cmd_stats)

    export = commands.add_parser(
        "export", parents=[common], help="stored responses as a HAR 1.2 file"
    )
    export.add_argument("file", metavar="FILE.har")
    export.add_argument(
        "--url-prefix", metavar="P", help="only entries whose URL starts with P"
    )
    export.set_defaults(run=cmd_export)

    load = commands.add_parser(
        "import",
        parents=[common],
        help="warm the store from a HAR file",
        description="Store each complete GET response of a HAR file as a recorded"
        " entry (replayed by --offline). Bodies in HAR files are decoded, so"
        " Content-Encoding and Content-Length are dropped from their headers.",
    )
    load.add_argument("file", metavar="FILE.har")
    load.set_defaults(run=cmd_import)

    ca_common = argparse.ArgumentParser(add_help=False)
    ca_common.add_argument(
        "--ca-dir",
        default=str(DEFAULT_DIRECTORY),
        metavar="DIR",
        help=f"where the local CA lives (default {DEFAULT_DIRECTORY})",
    )
    ca = commands.add_parser(
        "ca", help="the local CA that --intercept signs host certificates with"
    )
    ca_commands = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ca_commands.add_parser(
        "init",
        parents=[ca_common],
        help="create the local CA; prints how to trust it",
        description="Create a CA key (mode 0600) and a ten-year certificate in DIR,"
        " and print how to make clients trust it.",
    )
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA in DIR"
    )
    init.set_defaults(run=cmd_ca_init)
    show = ca_commands.add_parser(
        "show", parents=[ca_common], help="its SHA-256 fingerprint and expiry"
    )
    show.set_defaults(run=cmd_ca_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``cacheproxy`` command; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status: int = args.run(args)
        return status
    except _UsageError as exc:
        getattr(args, "subparser", parser).print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (CliError, CAError) as exc:
        message = str(exc)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}{exc.strerror or exc}"
    except (sqlite3.Error, diskcache.Timeout) as exc:
        message = f"the cache database in {args.cache_dir} failed: {exc}"
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
