"""TLS interception: which hosts, our side of the client's TLS, and the origin's.

Rules of this module:
- ``--intercept`` patterns are checked once (``check_pattern``) and then matched
  per CONNECT (``matches``); both are pure and know no TLS.
- The client side (``Interceptor``) presents a host certificate signed by the
  local CA for the name the client asks for (SNI), else for the CONNECT host;
  offers ALPN ``http/1.1`` only; speaks TLS 1.2 or newer; sends the host
  certificate alone (the CA is the clients' trust anchor, so it need not travel).
- The origin side (``origin_tls_policy``) verifies fully and fails closed: the
  chain against the system store or ``--upstream-ca``, the name with
  ``service_identity``; a certificate that fails is an error with a reason
  (``describe_tls_failure``), never a downgrade.
- No private key is ever logged; errors name files, never their contents.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    IPAddress_ID,
    ServiceID,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, HostnameCachingHTTPSPolicy
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from cacheproxy.ca import RENEW_BEFORE, Authority, leaf_for

log = Logger()

HTTP_1_1 = b"http/1.1"
"""The only application protocol offered to intercepted clients (ALPN)."""
MAX_HOSTS = 1024
"""How many hosts' loaded contexts stay in memory (least recently used go)."""
ORIGIN_POLICY_CACHE = 100
"""How many origins' verifying TLS settings (trust store loaded) are kept."""

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_PATTERN_HELP = "expected *, a host name, *.domain or an IP address"


# ---------------------------------------------------------------------------
# Which hosts: --intercept HOST_PATTERN
# ---------------------------------------------------------------------------


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``text`` spells (IPv6 with or without brackets), or None."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        return None


def canonical_host(host: str) -> str:
    """``host`` as compared: an IP in canonical form, a name lower-case, no final dot.

    A name that is not ASCII is turned into its IDNA (``xn--``) form when it can be.
    """
    address = _address(host)
    if address is not None:
        return str(address)
    name = host.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return name


def _is_dns_name(name: str) -> bool:
    """Whether ``name`` (canonical) is a syntactically valid DNS name."""
    return 0 < len(name) <= 253 and all(
        _LABEL.fullmatch(label) for label in name.split(".")
    )


def check_pattern(text: str) -> str:
    """``text`` as a valid ``--intercept`` pattern in canonical form; else ValueError.

    Valid: ``*`` (every host), ``*.example.org`` (every host below example.org),
    a host name (``pypi.org``), an IP address (``10.0.0.5``, ``[2001:db8::1]``).
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("an --intercept pattern must not be empty")
    if stripped == "*":
        return "*"
    wildcard = stripped.startswith("*.")
    rest = stripped[2:] if wildcard else stripped
    if not wildcard and _address(rest) is not None:
        return canonical_host(rest)
    name = canonical_host(rest)
    if "*" in name:
        raise ValueError(f"not a host pattern: {text!r} (* only alone or as *.domain)")
    if not _is_dns_name(name) or _address(name) is not None:
        raise ValueError(f"not a host pattern: {text!r} ({_PATTERN_HELP})")
    return f"*.{name}" if wildcard else name


def _matches_one(pattern: str, host: str, is_address: bool) -> bool:
    """Whether one pattern (canonical or not) matches ``host`` (canonical)."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = canonical_host(pattern[2:])
        return not is_address and host.endswith("." + suffix)
    return canonical_host(pattern) == host


def matches(patterns: Sequence[str], host: str) -> bool:
    """Whether ``host`` (a CONNECT or SNI host) is to be intercepted.

    ``*`` matches every host; ``*.example.org`` every name below example.org, at
    any depth, but not example.org itself; anything else one name exactly
    (case-insensitive, a final dot ignored) or one IP address.
    """
    if not host or not patterns:
        return False
    canonical = canonical_host(host)
    is_address = _address(host) is not None
    return any(_matches_one(p, canonical, is_address) for p in patterns)


# ---------------------------------------------------------------------------
# The client side: our TLS server with host certificates from the local CA
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCertificate:
    """One host's certificate, loaded once into its own server context.

    @ivar certificate: the host certificate, signed by the local CA.
    @ivar context: a server context presenting it (with its key), otherwise
        configured as every intercepting context is.
    @ivar renew_at: when to stop using it (a day before it expires).
    """

    certificate: x509.Certificate
    context: SSL.Context
    renew_at: datetime


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    """Makes the server side of one intercepted connection (``startTLS``'s argument).

    @ivar _default: the CONNECT host's certificate, presented unless the client's
        SNI names another host that may be intercepted.
    """

    def __init__(self, default: HostCertificate) -> None:
        self._default = default

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        """A server connection presenting the CONNECT host's certificate."""
        return SSL.Connection(self._default.context, None)


def _select_http_1_1(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """ALPN: ``http/1.1`` if offered, else no protocol at all (RFC 7301 section 3.2).

    A client that offered only ``h2`` gets no ALPN answer; it either speaks
    HTTP/1.1 anyway or ends the connection itself.
    """
    return HTTP_1_1 if HTTP_1_1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


class Interceptor:
    """Terminates intercepted clients' TLS with host certificates from the local CA.

    Use: ``transport.startTLS(interceptor.creator_for(connect_host))``. Every host
    gets its own OpenSSL context, made once (about 23 KiB each); the SNI callback
    switches a connection to the context of the host the client names.

    @ivar authority: the loaded local CA that signs host certificates.
    @ivar _now: the clock, for certificate validity.
    @ivar _allowed: the ``--intercept`` patterns an SNI name must match to get its
        own certificate; other SNI names get the CONNECT host's.
    @ivar _leaves: host certificate and key PEMs, ``leaf_for``'s memory cache.
    @ivar _loaded: per host (canonical name), its loaded certificate and context,
        so a repeat connection parses nothing; least recently used first.
    """

    def __init__(
        self,
        authority: Authority,
        now: Callable[[], datetime],
        patterns: Sequence[str] = ("*",),
        max_hosts: int = MAX_HOSTS,
    ) -> None:
        self.authority = authority
        self._now = now
        self._allowed = tuple(patterns)
        self._max_hosts = max_hosts
        self._leaves: dict[str, tuple[bytes, bytes]] = {}
        self._loaded: OrderedDict[str, HostCertificate] = OrderedDict()

    def creator_for(self, connect_host: str) -> IOpenSSLServerConnectionCreator:
        """What ``startTLS`` needs to intercept a CONNECT to ``connect_host``.

        Makes (or loads) the host certificate now, so a problem shows before the
        handshake: ValueError for a host that is not a name or an address,
        CAError or OSError if ``leaf/`` cannot be written.
        """
        return _ServerCreator(self.load(connect_host))

    def load(self, host: str) -> HostCertificate:
        """The certificate and context for ``host``, from memory, disk, or made now."""
        key = canonical_host(host)
        now = self._now()
        loaded = self._loaded.get(key)
        if loaded is not None and now < loaded.renew_at:
            self._loaded.move_to_end(key)
            return loaded
        cert_pem, key_pem = leaf_for(self.authority, key, now=now, cache=self._leaves)
        certificate = x509.load_pem_x509_certificate(cert_pem)
        private_key = serialization.load_pem_private_key(key_pem, password=None)
        loaded = HostCertificate(
            certificate=certificate,
            context=self._make_context(certificate, private_key),
            renew_at=certificate.not_valid_after_utc - RENEW_BEFORE,
        )
        self._loaded[key] = loaded
        self._loaded.move_to_end(key)
        while len(self._loaded) > self._max_hosts:
            evicted, _ = self._loaded.popitem(last=False)
            self._leaves.pop(evicted, None)
        return loaded

    def _make_context(self, certificate: x509.Certificate, key: Any) -> SSL.Context:
        """A server context: TLS 1.2+, ALPN http/1.1, SNI, this host certificate.

        Only the host certificate is sent, not the CA: clients that trust the CA
        hold it already, and a chain adds nothing they can use.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_session_id(b"cacheproxy-intercept")
        context.use_certificate(certificate)
        context.use_privatekey(key)
        context.check_privatekey()
        context.set_alpn_select_callback(_select_http_1_1)
        context.set_tlsext_servername_callback(self._on_server_name)
        return context

    def _on_server_name(self, connection: SSL.Connection) -> None:
        """SNI: present the named host's certificate if the name is acceptable.

        A missing, malformed or not intercepted name keeps the CONNECT host's
        certificate; the client then rejects it if it wanted another name.
        """
        raw = connection.get_servername()
        if not raw:
            return
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            return
        if not matches(self._allowed, name):
            return
        try:
            loaded = self.load(name)
        except ValueError:
            return  # not a host name: keep the CONNECT host's certificate
        except Exception:
            log.failure("cannot make a host certificate for {name}", name=name)
            return
        if loaded.context is not connection.get_context():
            connection.set_context(loaded.context)


# ---------------------------------------------------------------------------
# The origin side: full verification, with a reason when it fails
# ---------------------------------------------------------------------------

_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    25: "path length constraint exceeded",
    26: "unsuitable certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    47: "permitted subtree violation",
    48: "excluded subtree violation",
    66: "EE certificate key too weak",
    67: "CA certificate key too weak",
    68: "CA signature digest algorithm too weak",
}
"""OpenSSL's X509_V_ERR_* codes, as X509_verify_cert_error_string says them."""


_SUBJECT = "the origin's certificate"
_PREFIX = f"{_SUBJECT} failed verification: "


class OriginCertificateError(Exception):
    """The origin's certificate failed verification; the message says why."""


def _verify_error(code: int, depth: int) -> str:
    """The reason for OpenSSL verify error ``code`` met at chain ``depth``."""
    text = _VERIFY_ERRORS.get(code, f"X509 verify error {code}")
    where = "" if depth == 0 else f" at depth {depth}"
    return f"{_PREFIX}certificate verify failed ({text}{where})"


def _service_id(hostname: str) -> ServiceID:
    """What the certificate must name: a DNS name, or an IP address."""
    address = _address(hostname)
    if address is not None:
        return IPAddress_ID(str(address))
    return DNS_ID(hostname)


def _verify_callback(
    tls: TLSMemoryBIOProtocol, service_id: ServiceID
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    """OpenSSL's verify callback for one origin connection; it fails closed.

    Twisted's own callback accepts a certificate without subjectAltName for
    any name (service_identity's CertificateError escapes its except clause and
    is only logged); this one refuses it, and says why any refusal happened.
    """
    owner: TLSMemoryBIOProtocol | None = tls

    def fail(reason: str) -> bool:
        nonlocal owner
        if owner is not None:
            owner.failVerification(Failure(OriginCertificateError(reason)))
            owner = None
        return False

    def verify(
        connection: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int
    ) -> bool:
        nonlocal owner
        try:
            if not ok:
                return fail(_verify_error(code, depth))
            if depth != 0:
                return True
            try:
                verify_service_identity(extract_patterns(cert), [service_id], [])
            except VerificationError:
                return fail(f"{_SUBJECT} does not match {_id_text(service_id)}")
            except CertificateError:
                return fail(f"{_SUBJECT} names no host (it has no subjectAltName)")
            owner = None
            return True
        except Exception:
            log.failure("while verifying an origin's certificate")
            return fail(f"{_SUBJECT} could not be verified (an internal error)")

    return verify


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingCreator:
    """Twisted's client TLS settings for one origin, with our verify callback."""

    def __init__(self, inner: IOpenSSLClientConnectionCreator, hostname: str) -> None:
        self._inner = inner
        self._service_id = _service_id(hostname)

    def clientConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        """The connection Twisted would make, verified by ``_verify_callback``."""
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verify_callback(tlsProtocol, self._service_id),
        )
        return connection


@implementer(IPolicyForHTTPS)
class _VerifyingPolicy:
    """``BrowserLikePolicyForHTTPS`` whose refusals say why (see _verify_callback)."""

    def __init__(self, trust_root: Any) -> None:
        self._browser = BrowserLikePolicyForHTTPS(trust_root)

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        """Settings that verify the origin ``hostname`` (IDNA bytes) fully."""
        text = hostname.decode("ascii")
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        inner = self._browser.creatorForNetloc(text.encode("ascii"), port)
        return _VerifyingCreator(inner, text)


def origin_tls_policy(upstream_ca: Path | None = None) -> IPolicyForHTTPS:
    """How Agent verifies origins: the system store, or only ``upstream_ca``'s certs.

    ``upstream_ca`` is a PEM file of one or more certificates; one that cannot be
    read or holds none is a ValueError naming the file.
    """
    trust_root = None if upstream_ca is None else _trust_root(upstream_ca)
    return HostnameCachingHTTPSPolicy(
        _VerifyingPolicy(trust_root), cacheSize=ORIGIN_POLICY_CACHE
    )


def _trust_root(path: Path) -> Any:
    """A Twisted trust root of the certificates in the PEM file ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates]
    )


# ---------------------------------------------------------------------------
# Why an origin request failed, when TLS verification is the reason
# ---------------------------------------------------------------------------


def _id_text(service_id: object) -> str:
    """The name or address a service_identity ID stands for."""
    hostname = getattr(service_id, "hostname", None)
    if isinstance(hostname, bytes):
        return hostname.decode("ascii", "replace")
    ip = getattr(service_id, "ip", None)
    if ip is not None:
        return str(ip)
    return str(service_id)


def _describe_one(error: BaseException) -> str | None:
    """The reason for one exception, or None if it is no verification problem."""
    if isinstance(error, OriginCertificateError):
        return str(error)
    if isinstance(error, VerificationError):
        names = ", ".join(_id_text(e.mismatched_id) for e in error.errors)
        return f"{_SUBJECT} does not match {names}"
    if isinstance(error, CertificateError):
        return f"{_SUBJECT} names no host (it has no subjectAltName)"
    if isinstance(error, SSL.Error):
        reasons = [r[2] for r in error.args[0] if isinstance(r, tuple) and len(r) == 3]
        if any("certificate verify failed" in r for r in reasons):
            return _PREFIX + "certificate verify failed"
    return None


def describe_tls_failure(failure: Failure | BaseException) -> str | None:
    """A one-line reason if ``failure`` is an origin certificate failing verification.

    Agent fails a request whose TLS handshake failed with ``ResponseNeverReceived``
    (or ``RequestTransmissionFailed``, ``ResponseFailed``), whose ``reasons`` are
    Failures of ``OriginCertificateError`` (from ``origin_tls_policy``),
    ``service_identity.VerificationError`` or ``OpenSSL.SSL.Error`` (from other
    policies). Anything else gives None.
    """
    error = failure.value if isinstance(failure, Failure) else failure
    if not isinstance(error, BaseException):
        return None
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list):
        for reason in reasons:
            if isinstance(reason, Failure | BaseException):
                described = describe_tls_failure(reason)
                if described is not None:
                    return described
        return None
    try:
        return _describe_one(error)
    except Exception:
        return None
