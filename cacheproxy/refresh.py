"""Refresh patterns: heuristic freshness chosen by URL (RFC 9111 section 4.2.2).

Many package mirrors (Debian's among them) send no Cache-Control, Expires, ETag or
Last-Modified, so the default heuristic (10% of the Last-Modified age) gives their
files no freshness at all, and without validators every reuse is a full refetch.
A refresh pattern, written ``REGEX MIN PCT MAX [immutable]`` as in Squid, says how
long such responses stay fresh:

- REGEX is searched (``re.search``, case-sensitive unless it says ``(?i)``) in the
  normalised absolute URL (L{cacheproxy.policy.cache_key}). It is one
  whitespace-free word: a normalised URL writes a space as ``%20``.
- MIN and MAX are minutes, PCT a percent (``20`` or ``20%``) of the response's
  Last-Modified age; the lifetime is ``PCT% * (Date - Last-Modified)`` clamped to
  ``[MIN, MAX]``, and MIN when there is no Last-Modified.
- ``immutable`` marks content-addressed URLs: like ``Cache-Control: immutable``
  (RFC 8246) a fresh response is served despite a client's ``no-cache`` or
  ``max-age=0``.

Rules of this module:
- It imports only the standard library, L{cacheproxy.model} and
  L{cacheproxy.policy}; like the policy it never reads the clock.
- A rule applies only to a 200 response without explicit freshness (s-maxage,
  max-age or Expires, even invalid ones: RFC 9111 section 4.2.2 forbids heuristics
  then). Other statuses keep the RFC defaults, so a 404 for a file that a mirror
  has not synced yet is never kept for a year.
- The first matching rule wins; user rules come before L{builtin_rules}.
- A rule's MAX replaces the ``--heuristic-cap``: the operator (or the built-in
  table below) chose it for these URLs on purpose.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

from cacheproxy.model import Entry, RefreshRule, ResponseHead, header_values
from cacheproxy.policy import (
    cache_control,
    cache_key,
    entry_lifetime,
    is_immutable,
    parse_http_date,
)

# Only a full 200 is worth a long, URL-chosen lifetime; see the module docstring.
RULE_STATUSES: frozenset[int] = frozenset({200})

_OPTIONS = frozenset({"immutable"})
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _number(word: str, what: str, text: str) -> float:
    """A non-negative finite number, or ValueError naming ``what``."""
    if not _NUMBER.fullmatch(word):
        raise ValueError(f"refresh pattern {text!r}: {what} {word!r} is not a number")
    value = float(word)
    if value < 0:
        raise ValueError(f"refresh pattern {text!r}: {what} {word!r} is negative")
    if not math.isfinite(value):
        raise ValueError(f"refresh pattern {text!r}: {what} {word!r} is too large")
    return value


def parse_refresh_pattern(text: str) -> RefreshRule:
    """The rule written ``REGEX MIN PCT MAX [immutable]``; ValueError if malformed.

    MIN and MAX in minutes, PCT optionally followed by ``%``; MIN must not exceed
    MAX, and no value may be negative.
    """
    words = text.split()
    if len(words) < 4:
        raise ValueError(
            f"refresh pattern {text!r}: expected 'REGEX MIN PCT MAX [immutable]'"
        )
    regex, min_word, pct_word, max_word, *options = words
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"refresh pattern {text!r}: bad regex: {exc}") from None
    minimum = _number(min_word, "MIN", text)
    pct = pct_word[:-1] if pct_word.endswith("%") else pct_word
    percent = _number(pct, "PCT", text)
    maximum = _number(max_word, "MAX", text)
    if minimum > maximum:
        raise ValueError(f"refresh pattern {text!r}: MIN {min_word} exceeds MAX")
    for option in options:
        if option not in _OPTIONS:
            raise ValueError(
                f"refresh pattern {text!r}: unknown option {option!r}"
                f" (known: {', '.join(sorted(_OPTIONS))})"
            )
    if len(set(options)) != len(options):
        raise ValueError(f"refresh pattern {text!r}: repeated option")
    return RefreshRule(
        pattern=pattern,
        minimum=minimum * 60,
        percent=percent,
        maximum=maximum * 60,
        immutable="immutable" in options,
        source=" ".join(words),
    )


# ---------------------------------------------------------------------------
# Built-in rules
# ---------------------------------------------------------------------------

# Index files come first so that a URL matching both kinds gets the short,
# revalidated lifetime.  MIN 0: without Last-Modified nothing is assumed fresh.
# PCT 20 of the Last-Modified age, at most MAX 5 minutes: a client sees a
# newly published Release (Debian mirrors sync four times a day, PyPI uploads
# at any time) within five minutes, yet when the mirror sends Last-Modified a
# LAN of machines running "apt update" together fetches it once.  Keeping
# Release and the indexes it lists on the same short lifetime bounds the window
# in which a non-by-hash client could see them disagree (a "Hash Sum mismatch").
# These rules mostly *shorten* the default heuristic, which could keep a
# Release modified six hours ago fresh for 36 minutes.
_INDEX = "0 20% 5"

# Package files never change once published: Debian's archive, PyPI, crates.io,
# RubyGems and nuget.org refuse a second upload under the same name and
# version, and by-hash or hash-prefixed names are content addresses.  A year
# (525600 minutes) whatever Last-Modified says, and immutable so that apt's
# "Cache-Control: max-age=0" or a browser reload do not refetch them.
_PACKAGE = "525600 100% 525600 immutable"

_BUILTIN_SOURCES: tuple[str, ...] = (
    # apt: (In)Release and its detached signature, also in flat repositories.
    rf"/(?:In)?Release(?:\.gpg)?$ {_INDEX}",
    # apt: Packages and Sources, compressed, and their pdiff indexes.
    rf"/(?:Packages|Sources)(?:\.(?:gz|bz2|xz|lzma|zst)|\.diff/Index)?$ {_INDEX}",
    # apt: Contents-*, Translation-*, DEP-11 Components-*, Commands-* under dists/.
    rf"/dists/[^?]*/(?:Contents|Translation|Components|Commands)-[^?]+$ {_INDEX}",
    # yum/dnf: repomd.xml (and its signature) names the hashed metadata files.
    rf"/repodata/repomd\.xml(?:\.asc|\.key)?$ {_INDEX}",
    # Alpine: the repository index.
    rf"/APKINDEX\.tar\.gz$ {_INDEX}",
    # PyPI and its mirrors: the simple index and each project's page.
    rf"/simple/(?:[^/?]+/)?$ {_INDEX}",
    # apt: index files fetched by their hash (Acquire-By-Hash).
    rf"/by-hash/(?:SHA256|SHA512|MD5Sum)/[0-9a-f]{{32,128}}$ {_PACKAGE}",
    # Debian/Ubuntu pool: binary, source and debug packages.
    r"/pool/[^?]+\.(?:u?deb|ddeb|dsc|diff\.gz|tar\.(?:gz|bz2|xz|lzma|zst))$"
    f" {_PACKAGE}",
    # yum/dnf: RPMs and delta RPMs named name-version-release.arch, never a
    # vendor's mutable "..._current_x86_64.rpm".
    rf"/[^/?]+-[^/?-]+-[^/?-]+\.[A-Za-z0-9_]+\.d?rpm$ {_PACKAGE}",
    # yum/dnf: metadata named by its checksum (createrepo's default).
    rf"/repodata/[0-9a-f]{{32,128}}-[^/?]+$ {_PACKAGE}",
    # Alpine packages: always name-version-rN.apk (not any Android .apk).
    rf"/[^/?]+-r\d+\.apk$ {_PACKAGE}",
    # Python: wheels, name-version[-build]-python-abi-platform (PEP 427); PyPI
    # never reuses a file name.
    rf"/[^/?-]+(?:-[^/?-]+){{4,5}}\.whl$ {_PACKAGE}",
    # Python: files.pythonhosted.org, hash-addressed or /packages/source/ sdists.
    r"/packages/(?:[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{60}|source/[^/?]/[^/?]+)"
    rf"/[^/?]+$ {_PACKAGE}",
    # Rust: crates.io downloads, name-version.crate.
    rf"/[^/?]+-\d+\.\d+\.\d+[^/?]*\.crate$ {_PACKAGE}",
    # Ruby: rubygems.org downloads, name-version[-platform].gem.
    rf"/gems/[^/?]+-\d[^/?]*\.gem$ {_PACKAGE}",
    # .NET: nuget.org flat container packages, id.version.nupkg.
    rf"/[^/?]+\.\d+\.\d+[^/?]*\.nupkg$ {_PACKAGE}",
)

_BUILTIN: tuple[RefreshRule, ...] = tuple(
    parse_refresh_pattern(source) for source in _BUILTIN_SOURCES
)


def builtin_rules() -> tuple[RefreshRule, ...]:
    """The rules cacheproxy applies after the user's (see the table above)."""
    return _BUILTIN


# ---------------------------------------------------------------------------
# Applying rules (RFC 9111 section 4.2.2)
# ---------------------------------------------------------------------------


def matching_rule(url: str, rules: Sequence[RefreshRule]) -> RefreshRule | None:
    """The first rule whose pattern is found in ``url``, or None."""
    for rule in rules:
        if rule.pattern.search(url):
            return rule
    return None


def is_explicitly_fresh(response: ResponseHead) -> bool:
    """Whether the response states its own freshness, so no heuristic applies.

    RFC 9111 section 4.2.2: s-maxage, max-age or Expires (section 4.2.1), present
    even if invalid (then the response is stale, not heuristically fresh).
    """
    cc = cache_control(response.headers)
    return (
        "s-maxage" in cc
        or "max-age" in cc
        or bool(header_values(response.headers, b"expires"))
    )


def _first_date(response: ResponseHead, name: bytes) -> float | None:
    """The first field line of a date field, parsed (RFC 9111 section 4.2.1)."""
    values = header_values(response.headers, name)
    return parse_http_date(values[0]) if values else None


def heuristic_lifetime(
    rule: RefreshRule, response: ResponseHead, response_time: float
) -> float:
    """Seconds of heuristic freshness ``rule`` gives ``response``.

    RFC 9111 section 4.2.2: ``percent`` of ``Date - Last-Modified`` (Date, else
    ``response_time`` per RFC 9110 section 6.6.1), clamped to the rule's bounds;
    the minimum without a valid Last-Modified. Never negative.
    """
    last_modified = _first_date(response, b"last-modified")
    if last_modified is None:
        return max(0.0, rule.minimum)
    date = _first_date(response, b"date")
    age = max(0.0, (response_time if date is None else date) - last_modified)
    estimate = rule.percent / 100 * age
    return max(0.0, rule.minimum, min(rule.maximum, estimate))


def _url(entry: Entry) -> str:
    """The normalised absolute URL of a stored entry (its cache key)."""
    if "://" in entry.key:
        return entry.key
    try:
        return cache_key(entry.url.encode("latin-1"))
    except (ValueError, UnicodeEncodeError):
        return entry.url


def _applicable_rule(
    response: ResponseHead, url: str, rules: Sequence[RefreshRule]
) -> RefreshRule | None:
    """The rule that governs ``response``: a 200 without explicit freshness."""
    if response.status not in RULE_STATUSES or is_explicitly_fresh(response):
        return None
    return matching_rule(url, rules)


def lifetime_with_rules(
    entry: Entry, rules: Sequence[RefreshRule], *, heuristic_cap: float
) -> float:
    """The freshness lifetime cacheproxy uses for a stored entry.

    RFC 9111 section 4.2.1 (explicit freshness wins), else section 4.2.2: the
    first matching rule's L{heuristic_lifetime}, else the default heuristic of
    L{cacheproxy.policy.entry_lifetime} capped at ``heuristic_cap``.
    """
    # The same path the proxy takes: annotate with the rules, then ask the policy.
    return entry_lifetime(with_rules(entry, rules), heuristic_cap=heuristic_cap)


def is_immutable_match(entry: Entry, rules: Sequence[RefreshRule]) -> bool:
    """Whether a fresh ``entry`` is served despite request no-cache and max-age.

    RFC 8246 section 2 (``Cache-Control: immutable`` from the origin), or an
    C{immutable} rule governing the entry (a 200 without explicit freshness,
    RFC 9111 section 4.2.2). The origin's unqualified ``no-cache`` (RFC 9111
    section 5.2.2.4) outranks a rule.
    """
    if is_immutable(entry.response):
        return True
    cc = cache_control(entry.response.headers)
    if "no-cache" in cc and not cc["no-cache"]:
        return False
    rule = _applicable_rule(entry.response, _url(entry), rules)
    return rule is not None and rule.immutable


def with_rules(entry: Entry, rules: Sequence[RefreshRule]) -> Entry:
    """``entry`` annotated with what ``rules`` say of its freshness.

    RFC 9111 section 4.2.2: a cache may choose a heuristic for responses without
    explicit freshness; the lifetime and immutability go in the entry's transient
    ``local_lifetime`` and ``local_immutable`` for L{cacheproxy.policy} to use.
    """
    rule = _applicable_rule(entry.response, _url(entry), rules)
    if rule is None:
        return entry
    return replace(
        entry,
        local_lifetime=heuristic_lifetime(rule, entry.response, entry.response_time),
        local_immutable=is_immutable_match(entry, rules),
    )
