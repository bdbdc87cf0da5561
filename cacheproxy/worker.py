"""A worker process of ``--workers N``: serve on the listening socket the parent
passed down, with the same options as the parent.

Run by L{cacheproxy.service.Workers}, not by people:
``python -m cacheproxy.worker --listen-fd 3 --worker 1/4 -- <options>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver

from cacheproxy.options import Options
from cacheproxy.service import ProxyService


def _worker(text: str) -> tuple[int, int]:
    """``"2/4"``: worker 2 of 4."""
    number, _, workers = text.partition("/")
    return int(number), int(workers)


def main(argv: list[str] | None = None) -> int:
    """Parse, adopt the socket, run until SIGTERM."""
    parser = argparse.ArgumentParser(prog="cacheproxy.worker")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--worker", type=_worker, default=None, help="NUMBER/WORKERS")
    parser.add_argument("options", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    raw = args.options[1:] if args.options[:1] == ["--"] else args.options
    options = Options()
    options.parseOptions(raw)
    config = dataclasses.replace(options["config"], workers=1)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    from twisted.internet import reactor  # noqa: TID251 (a process's entry point)

    service = ProxyService(
        config, reactor, listen_fd=args.listen_fd, worker=args.worker
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
