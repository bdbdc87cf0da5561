"""Tables for refresh patterns: URL-chosen heuristic freshness (RFC 9111 4.2.2)."""

from __future__ import annotations

import ast
import re
import sys
from email.utils import formatdate
from pathlib import Path

import pytest

from cacheproxy import refresh
from cacheproxy.model import Entry, Headers, ResponseHead
from cacheproxy.policy import cache_key, entry_lifetime
from cacheproxy.refresh import (
    RefreshRule,
    builtin_rules,
    heuristic_lifetime,
    is_explicitly_fresh,
    is_immutable_match,
    lifetime_with_rules,
    matching_rule,
    parse_refresh_pattern,
)

T0 = 1_700_000_000.0
MINUTE = 60.0
DAY = 86400.0
YEAR = 365 * DAY
HEX64 = "3f" * 32

DEB = "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
BY_HASH = (
    "http://archive.ubuntu.com/ubuntu/dists/jammy/main/binary-amd64/by-hash/SHA256/"
    + HEX64
)
IN_RELEASE = "http://deb.debian.org/debian/dists/bookworm/InRelease"
PACKAGES_XZ = (
    "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz"
)
WHEEL = (
    "https://files.pythonhosted.org/packages/70/8e/"
    "0e2d847013cb52cd35b38c009bb167a1a26b2ce6cd6965bf26b47bc0bf44/"
    "requests-2.31.0-py3-none-any.whl"
)
RPM = (
    "http://dl.fedoraproject.org/pub/fedora/linux/releases/39/Everything/x86_64/os/"
    "Packages/b/bash-5.2.21-1.fc39.x86_64.rpm"
)


def date(t: float) -> bytes:
    """An IMF-fixdate for ``t``."""
    return formatdate(t, usegmt=True).encode("ascii")


def ok(*headers: tuple[bytes, bytes], status: int = 200) -> ResponseHead:
    """A response with ``headers``."""
    return ResponseHead(status=status, reason=b"OK", headers=tuple(headers))


def stored(url: str, *headers: tuple[bytes, bytes], status: int = 200) -> Entry:
    """An entry for ``url``, received at T0, whose response carries ``headers``."""
    return Entry(
        key=cache_key(url.encode("latin-1")),
        url=url,
        response=ok(*headers, status=status),
        request_time=T0,
        response_time=T0,
    )


def rule(text: str) -> RefreshRule:
    """The rule ``text`` parses to."""
    return parse_refresh_pattern(text)


def modified(days_ago: float) -> Headers:
    """Date at T0 and Last-Modified ``days_ago`` days before it."""
    return ((b"Date", date(T0)), (b"Last-Modified", date(T0 - days_ago * DAY)))


# --- Parsing ------------------------------------------------------------------

VALID = [
    pytest.param(
        r"\.iso$ 10 20% 60",
        (r"\.iso$", 600.0, 20.0, 3600.0, False),
        id="percent-sign",
    ),
    pytest.param(
        r"\.iso$ 10 20 60", (r"\.iso$", 600.0, 20.0, 3600.0, False), id="bare-percent"
    ),
    pytest.param(
        "/by-id/ 1440 100% 1440 immutable",
        ("/by-id/", DAY, 100.0, DAY, True),
        id="immutable",
    ),
    pytest.param(
        "  x   0.5 12.5%   1.5  ", ("x", 30.0, 12.5, 90.0, False), id="decimals-spaces"
    ),
    pytest.param("x 0 0 0", ("x", 0.0, 0.0, 0.0, False), id="all-zero"),
    pytest.param("x 1 250% 2", ("x", 60.0, 250.0, 120.0, False), id="over-100-pct"),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_parse_valid(text: str, expected: tuple[str, float, float, float, bool]):
    """A well-formed rule parses to its regex, seconds, percent and option."""
    parsed = parse_refresh_pattern(text)
    fields = (
        parsed.pattern.pattern,
        parsed.minimum,
        parsed.percent,
        parsed.maximum,
        parsed.immutable,
    )
    assert fields == expected
    assert parsed.source == " ".join(text.split())


INVALID = [
    pytest.param("", "expected", id="empty"),
    pytest.param(r"\.iso$ 10 20%", "expected", id="too-few-fields"),
    pytest.param("([ 1 2 3", "bad regex", id="bad-regex"),
    pytest.param("x ten 20 60", "MIN 'ten' is not a number", id="min-not-number"),
    pytest.param("x 1 twenty 60", "PCT 'twenty' is not a number", id="pct-word"),
    pytest.param("x 1 20%% 60", "PCT '20%' is not a number", id="pct-double-sign"),
    pytest.param("x 1 20 6o", "MAX '6o' is not a number", id="max-not-number"),
    pytest.param("x 1 20 nan", "not a number", id="nan"),
    pytest.param("x 1 20 " + "9" * 400, "too large", id="infinite"),
    pytest.param("x -1 20 60", "MIN '-1' is negative", id="negative-min"),
    pytest.param("x 1 -20 60", "PCT '-20' is negative", id="negative-pct"),
    pytest.param("x 1 20 -60", "MAX '-60' is negative", id="negative-max"),
    pytest.param("x 61 20 60", "MIN 61 exceeds MAX", id="min-over-max"),
    pytest.param("x 1 20 60 immutabel", "unknown option 'immutabel'", id="typo"),
    pytest.param("x 1 20 60 override-expire", "unknown option", id="squid-option"),
    pytest.param("x 1 20 60 immutable immutable", "repeated option", id="repeat"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_parse_invalid(text: str, message: str):
    """A malformed rule raises ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_refresh_pattern(text)


def test_regex_is_case_sensitive_unless_it_says_so():
    """Patterns are case-sensitive; ``(?i)`` makes one insensitive."""
    url = "http://ex.com/FILE.ISO"
    assert matching_rule(url, [rule(r"\.iso$ 1 20 2")]) is None
    assert matching_rule(url, [rule(r"(?i)\.iso$ 1 20 2")]) is not None


# --- Which rule applies ---------------------------------------------------------


def test_first_match_wins():
    """Of several matching rules the first in order applies."""
    first, second = rule(r"\.deb$ 1 20 2"), rule(r"/pool/ 3 20 4")
    assert matching_rule(DEB, [first, second]) is first
    assert matching_rule(DEB, [second, first]) is second


def test_no_rule_matches():
    """A URL no pattern is found in has no rule."""
    assert matching_rule("http://ex.com/a", [rule(r"\.deb$ 1 20 2")]) is None


def test_user_rules_come_before_builtins():
    """A user rule placed before the built-ins overrides them for its URLs."""
    mine = rule(r"hello_.*\.deb$ 0 10 5")
    rules = (mine, *builtin_rules())
    assert matching_rule(DEB, rules) is mine
    assert lifetime_with_rules(stored(DEB), rules, heuristic_cap=DAY) == 0.0
    assert not is_immutable_match(stored(DEB), rules)


def test_builtins_parse_and_document_themselves():
    """Every built-in rule keeps its source text and reparses to itself."""
    for builtin in builtin_rules():
        assert builtin.source
        assert parse_refresh_pattern(builtin.source) == builtin


PACKAGE_URLS = [
    pytest.param(DEB, id="debian-deb"),
    pytest.param(
        "http://security.debian.org/debian-security/pool/updates/main/o/openssl/"
        "libssl3_3.0.11-1~deb12u2_amd64.deb",
        id="debian-security-deb",
    ),
    pytest.param(
        "http://archive.ubuntu.com/ubuntu/pool/main/d/debian-installer/"
        "foo-udeb_1.0_amd64.udeb",
        id="ubuntu-udeb",
    ),
    pytest.param(
        "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3.dsc",
        id="debian-dsc",
    ),
    pytest.param(
        "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10.orig.tar.gz",
        id="debian-orig-tarball",
    ),
    pytest.param(
        "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3.debian.tar.xz",
        id="debian-debian-tarball",
    ),
    pytest.param(
        "http://archive.ubuntu.com/ubuntu/pool/main/h/hello/hello_2.10-1.diff.gz",
        id="ubuntu-diff-gz",
    ),
    pytest.param(BY_HASH, id="ubuntu-by-hash-sha256"),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/main/i18n/by-hash/SHA512/"
        + "ab" * 64,
        id="debian-by-hash-sha512",
    ),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/main/by-hash/MD5Sum/" + "0" * 32,
        id="debian-by-hash-md5sum",
    ),
    pytest.param(RPM, id="fedora-rpm"),
    pytest.param(
        "http://mirror.example.org/fedora/updates/39/x86_64/repodata/"
        + HEX64
        + "-primary.xml.zst",
        id="fedora-hashed-repodata",
    ),
    pytest.param(
        "http://dl-cdn.alpinelinux.org/alpine/v3.19/main/x86_64/musl-1.2.4_git20230717-r4.apk",
        id="alpine-apk",
    ),
    pytest.param(WHEEL, id="pypi-wheel"),
    pytest.param(
        "https://download.pytorch.org/whl/cu118/"
        "torch-2.0.0%2Bcu118-cp310-cp310-linux_x86_64.whl",
        id="pytorch-wheel",
    ),
    pytest.param(
        "https://files.pythonhosted.org/packages/9d/be/"
        "10918a2eac4ae9f02f6cfe6414b7a155ccd8f7f9d4380d62fd5b955065c3/"
        "requests-2.31.0.tar.gz",
        id="pypi-sdist",
    ),
    pytest.param(
        "https://files.pythonhosted.org/packages/source/r/requests/requests-2.31.0.tar.gz",
        id="pypi-source-sdist",
    ),
    pytest.param(
        "https://static.crates.io/crates/serde/serde-1.0.193.crate", id="crate"
    ),
    pytest.param("https://rubygems.org/gems/rails-7.1.2.gem", id="gem"),
    pytest.param(
        "https://api.nuget.org/v3-flatcontainer/newtonsoft.json/13.0.3/"
        "newtonsoft.json.13.0.3.nupkg",
        id="nupkg",
    ),
]


@pytest.mark.parametrize("url", PACKAGE_URLS)
def test_builtins_treat_package_files_as_immutable(url: str):
    """Published package files match a long, immutable built-in rule."""
    found = matching_rule(cache_key(url.encode()), builtin_rules())
    assert found is not None
    assert found.immutable
    assert found.minimum == found.maximum == YEAR


INDEX_URLS = [
    pytest.param(IN_RELEASE, id="debian-inrelease"),
    pytest.param("http://deb.debian.org/debian/dists/bookworm/Release", id="release"),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/Release.gpg", id="release-gpg"
    ),
    pytest.param(PACKAGES_XZ, id="debian-packages-xz"),
    pytest.param(
        "http://archive.ubuntu.com/ubuntu/dists/jammy/main/binary-amd64/Packages",
        id="ubuntu-packages",
    ),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/main/source/Sources.gz",
        id="sources-gz",
    ),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.diff/Index",
        id="pdiff-index",
    ),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/main/Contents-amd64.gz",
        id="contents",
    ),
    pytest.param(
        "http://deb.debian.org/debian/dists/bookworm/main/i18n/Translation-en.bz2",
        id="translation",
    ),
    pytest.param("http://repo.example.org/flat/Release", id="flat-repo-release"),
    pytest.param(
        "http://mirror.example.org/fedora/updates/39/x86_64/repodata/repomd.xml",
        id="repomd",
    ),
    pytest.param(
        "http://dl-cdn.alpinelinux.org/alpine/v3.19/main/x86_64/APKINDEX.tar.gz",
        id="apkindex",
    ),
    pytest.param("https://pypi.org/simple/requests/", id="pypi-simple-project"),
    pytest.param("https://pypi.org/simple/", id="pypi-simple-root"),
]


@pytest.mark.parametrize("url", INDEX_URLS)
def test_builtins_keep_index_files_short_and_revalidated(url: str):
    """Repository indexes match a short built-in rule that is not immutable."""
    found = matching_rule(cache_key(url.encode()), builtin_rules())
    assert found is not None
    assert not found.immutable
    assert found.minimum == 0.0
    assert found.maximum <= 5 * MINUTE


OTHER_URLS = [
    pytest.param("http://example.com/index.html", id="web-page"),
    pytest.param("http://example.com/pool/notes.txt", id="pool-non-package"),
    pytest.param("http://example.com/", id="root"),
    pytest.param("http://example.com/app.apk", id="android-apk"),
    pytest.param(
        "https://dl.google.com/linux/direct/google-chrome-stable_current_x86_64.rpm",
        id="mutable-vendor-rpm",
    ),
    pytest.param("http://example.com/download/latest.whl", id="unversioned-whl"),
    pytest.param("http://example.com/packages/latest.tar.gz", id="generic-packages"),
    pytest.param(
        "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb?x=1",
        id="package-with-query",
    ),
    pytest.param(
        "http://archive.ubuntu.com/ubuntu/dists/jammy/by-hash/SHA256/nothex",
        id="by-hash-not-a-hash",
    ),
    pytest.param("http://example.com/Release/notes.html", id="release-directory"),
]


@pytest.mark.parametrize("url", OTHER_URLS)
def test_builtins_leave_other_urls_alone(url: str):
    """Ordinary web resources match no built-in rule."""
    assert matching_rule(cache_key(url.encode()), builtin_rules()) is None


# --- Heuristic lifetime (RFC 9111 section 4.2.2) --------------------------------

LIFETIMES = [
    pytest.param(
        "x 0 10 100000", modified(10), 0.0, DAY, id="percent-of-last-modified-age"
    ),
    pytest.param("x 0 50% 60", modified(10), 0.0, 3600.0, id="clamped-to-max"),
    pytest.param("x 30 10 60", modified(0.01), 0.0, 1800.0, id="clamped-to-min"),
    pytest.param("x 30 10 60", ((b"Date", date(T0)),), 0.0, 1800.0, id="no-lm-min"),
    pytest.param("x 0 10 60", (), 0.0, 0.0, id="no-lm-zero-min"),
    pytest.param(
        "x 30 10 60",
        ((b"Last-Modified", b"yesterday"),),
        0.0,
        1800.0,
        id="invalid-lm-is-absent",
    ),
    pytest.param(
        "x 0 10 100000",
        ((b"Last-Modified", date(T0 - 10 * DAY)),),
        0.0,
        DAY,
        id="no-date-uses-response-time",
    ),
    pytest.param(
        "x 0 10 100000",
        ((b"Date", b"garbage"), (b"Last-Modified", date(T0 - 10 * DAY))),
        0.0,
        DAY,
        id="invalid-date-uses-response-time",
    ),
    pytest.param(
        "x 0 10 60",
        ((b"Date", date(T0)), (b"Last-Modified", date(T0 + DAY))),
        0.0,
        0.0,
        id="future-lm-never-negative",
    ),
    pytest.param("x 0 10 100000", modified(10), -T0, DAY, id="date-beats-clock"),
]


@pytest.mark.parametrize(("text", "headers", "shift", "expected"), LIFETIMES)
def test_heuristic_lifetime(text: str, headers: Headers, shift: float, expected: float):
    """PCT of Date - Last-Modified clamped to [MIN, MAX]; MIN without it."""
    lifetime = heuristic_lifetime(rule(text), ok(*headers), T0 + shift)
    assert lifetime == pytest.approx(expected)


def test_heuristic_lifetime_of_unchecked_rule_is_never_negative():
    """A rule built by hand with bad bounds still yields no negative lifetime."""
    odd = RefreshRule(re.compile("x"), minimum=-5.0, percent=-10.0, maximum=-1.0)
    assert heuristic_lifetime(odd, ok(*modified(10)), T0) == 0.0
    assert heuristic_lifetime(odd, ok(), T0) == 0.0


EXPLICIT = [
    pytest.param(((b"Cache-Control", b"max-age=60"),), True, id="max-age"),
    pytest.param(((b"Cache-Control", b"s-maxage=60"),), True, id="s-maxage"),
    pytest.param(((b"Expires", date(T0 + 60)),), True, id="expires"),
    pytest.param(((b"Expires", b"0"),), True, id="invalid-expires"),
    pytest.param(((b"Cache-Control", b"max-age=abc"),), True, id="invalid-max-age"),
    pytest.param(((b"Cache-Control", b"public, immutable"),), False, id="public"),
    pytest.param(modified(1), False, id="last-modified-only"),
    pytest.param((), False, id="nothing"),
]


@pytest.mark.parametrize(("headers", "expected"), EXPLICIT)
def test_is_explicitly_fresh(headers: Headers, expected: bool):
    """s-maxage, max-age or Expires, valid or not, is explicit freshness (4.2.1)."""
    assert is_explicitly_fresh(ok(*headers)) is expected


# --- Lifetime of a stored entry -------------------------------------------------

RULES = (rule(r"\.deb$ 60 20 120"), rule(r"/immutable/ 1440 100 1440 immutable"))

ENTRY_LIFETIMES = [
    pytest.param(DEB, (), 200, 3600.0, id="rule-min-without-lm"),
    pytest.param(DEB, modified(0.01), 200, 3600.0, id="rule-clamped-to-min"),
    pytest.param(DEB, modified(100), 200, 7200.0, id="rule-clamped-to-max"),
    pytest.param(DEB, ((b"Cache-Control", b"max-age=5"),), 200, 5.0, id="max-age-wins"),
    pytest.param(
        DEB,
        ((b"Date", date(T0)), (b"Expires", date(T0 + 30))),
        200,
        30.0,
        id="expires-wins",
    ),
    pytest.param(
        DEB, ((b"Cache-Control", b"max-age=bad"),), 200, 0.0, id="invalid-max-age-wins"
    ),
    pytest.param(DEB, modified(100), 404, 8640.0, id="404-default-heuristic"),
    pytest.param(DEB, (), 301, 0.0, id="301-without-lm-not-fresh"),
    pytest.param(
        "http://ex.com/a.html", modified(100), 200, 8640.0, id="no-match-default"
    ),
    pytest.param(
        "http://ex.com/a.html", modified(1000), 200, 8640.0, id="default-capped"
    ),
]


@pytest.mark.parametrize(("url", "headers", "status", "expected"), ENTRY_LIFETIMES)
def test_lifetime_with_rules(url: str, headers: Headers, status: int, expected: float):
    """Explicit freshness wins, then a rule for a 200, then the default heuristic."""
    entry = stored(url, *headers, status=status)
    got = lifetime_with_rules(entry, RULES, heuristic_cap=8640.0)
    assert got == pytest.approx(expected)


def test_lifetime_without_rules_is_the_policy_lifetime():
    """With no rules the lifetime is exactly policy.entry_lifetime."""
    entry = stored(DEB, *modified(3))
    assert lifetime_with_rules(entry, (), heuristic_cap=DAY) == entry_lifetime(
        entry, heuristic_cap=DAY
    )


def test_rule_max_is_not_bound_by_heuristic_cap():
    """A rule's MAX replaces --heuristic-cap for the URLs it matches."""
    entry = stored(DEB, *modified(100))
    long = rule(r"\.deb$ 0 100 525600")
    assert lifetime_with_rules(entry, [long], heuristic_cap=DAY) == pytest.approx(
        100 * DAY
    )


def test_debian_mirror_deb_stays_fresh_a_year():
    """A .deb from a mirror that sends no freshness or validators is fresh a year."""
    entry = stored(DEB, (b"Content-Type", b"application/vnd.debian.binary-package"))
    assert lifetime_with_rules(entry, builtin_rules(), heuristic_cap=DAY) == YEAR
    assert entry_lifetime(entry, heuristic_cap=DAY) == 0.0


def test_inrelease_freshness_is_at_most_five_minutes():
    """An old InRelease is fresh for five minutes at most, not 10% of its age."""
    entry = stored(IN_RELEASE, *modified(0.25))
    assert lifetime_with_rules(entry, builtin_rules(), heuristic_cap=DAY) == 300.0
    assert entry_lifetime(entry, heuristic_cap=DAY) == pytest.approx(2160.0)


def test_lifetime_matches_the_normalised_url():
    """Rules see the normalised URL (cache key), not the spelling received."""
    entry = Entry(
        key="",
        url="HTTP://DEB.Debian.ORG:80/debian/pool/main/h/hello/%68ello_2.10-3_amd64.deb",
        response=ok(),
        request_time=T0,
        response_time=T0,
    )
    only_lower = rule(r"^http://deb\.debian\.org/debian/pool/.*/hello_ 60 0 60")
    assert lifetime_with_rules(entry, [only_lower], heuristic_cap=DAY) == 3600.0


# --- Immutable (RFC 8246, and rules) ------------------------------------------

IMMUTABLE = [
    pytest.param("http://ex.com/immutable/a", (), 200, True, id="rule-immutable"),
    pytest.param(DEB, (), 200, False, id="rule-not-immutable"),
    pytest.param("http://ex.com/a", (), 200, False, id="no-rule"),
    pytest.param(
        "http://ex.com/a",
        ((b"Cache-Control", b"max-age=60, immutable"),),
        200,
        True,
        id="origin-immutable",
    ),
    pytest.param(
        "http://ex.com/immutable/a",
        ((b"Cache-Control", b"max-age=60"),),
        200,
        False,
        id="explicit-freshness-disables-rule",
    ),
    pytest.param(
        "http://ex.com/immutable/a",
        ((b"Expires", date(T0 + 60)),),
        200,
        False,
        id="expires-disables-rule",
    ),
    pytest.param(
        "http://ex.com/immutable/a",
        ((b"Cache-Control", b"no-cache"),),
        200,
        False,
        id="origin-no-cache-outranks-rule",
    ),
    pytest.param("http://ex.com/immutable/a", (), 404, False, id="404-not-immutable"),
]


@pytest.mark.parametrize(("url", "headers", "status", "expected"), IMMUTABLE)
def test_is_immutable_match(url: str, headers: Headers, status: int, expected: bool):
    """Immutable from the origin, or from a rule governing a 200 without freshness."""
    entry = stored(url, *headers, status=status)
    assert is_immutable_match(entry, RULES) is expected


@pytest.mark.parametrize("url", [DEB, BY_HASH, WHEEL, RPM])
def test_builtin_package_rules_are_immutable(url: str):
    """Package files under the built-ins ignore a client's max-age=0 while fresh."""
    assert is_immutable_match(stored(url), builtin_rules())


@pytest.mark.parametrize("url", [IN_RELEASE, PACKAGES_XZ])
def test_builtin_index_rules_are_not_immutable(url: str):
    """Index files under the built-ins still honour a client's no-cache."""
    assert not is_immutable_match(stored(url), builtin_rules())


# --- Layering -----------------------------------------------------------------


def test_refresh_imports_only_stdlib_model_and_policy():
    """refresh.py imports the standard library, cacheproxy.model and .policy only."""
    tree = ast.parse(Path(refresh.__file__).read_text())
    allowed = {"cacheproxy.model", "cacheproxy.policy"}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name in allowed or name.split(".")[0] in sys.stdlib_module_names
