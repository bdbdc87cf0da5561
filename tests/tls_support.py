"""Test parts for HTTPS: a throwaway origin CA, an HTTPS origin, a CONNECT client.

The CA made here signs ORIGIN certificates only (what ``--upstream-ca`` trusts); it
is unrelated to cacheproxy's own CA in ``cacheproxy/ca.py``, which the proxy signs
its intercepting certificates with and which the client side trusts.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from tests.support import Origin, RawOrigin, _CountingSite, _RawOriginProtocol

TIMEOUT = 10.0
"""Seconds a blocking client waits on any one socket operation."""


@dataclass(frozen=True)
class TestCA:
    """A CA for origin certificates, written to ``pem`` (the certificate only)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: Path


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its key, as PEM files and as bytes."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path

    @property
    def der(self) -> bytes:
        """The certificate in DER, as ``getpeercert(binary_form=True)`` gives it."""
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_test_ca(directory: Path, name: str = "cacheproxy test origin CA") -> TestCA:
    """A fresh CA (valid from yesterday for a year); its PEM in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / "test-ca.pem"
    pem.write_bytes(_pem(certificate))
    return TestCA(certificate, key, pem)


def issue_server_cert(
    ca: TestCA | None,
    directory: Path,
    names: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1",),
    stem: str = "origin",
    common_name: str | None = None,
) -> ServerCert:
    """A server certificate for ``names`` and ``addresses``, signed by ``ca``.

    With ``ca`` None the certificate is self-signed (and trusted by nobody); with
    neither names nor addresses it has no subjectAltName, only ``common_name``.
    Written as ``<stem>.pem`` and ``<stem>.key`` in ``directory``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = _name(common_name or ([*names, *addresses] or ["origin"])[0])
    alternatives: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if ca is None else ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    if alternatives:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternatives), critical=False
        )
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.certificate.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    certificate = builder.sign(key if ca is None else ca.key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(_pem(certificate))
    key_path.write_bytes(_key_pem(key))
    return ServerCert(_pem(certificate), _key_pem(key), cert_path, key_path)


@dataclass
class HTTPSOrigin(Origin):
    """The counting origin of tests/support.py, over TLS; its URLs are https."""

    host: str = "127.0.0.1"

    def url(self, path: str) -> str:
        """The https URL of ``path``, naming the origin by ``host``."""
        authority = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{authority}:{self.port.getHost().port}{path}"

    async def stop(self) -> None:
        """Stop listening (connections still open end when their clients close)."""
        await defer.maybeDeferred(self.port.stopListening)


@implementer(IOpenSSLServerConnectionCreator)
class _ServerOptions:
    """A plain TLS server presenting ``cert`` (cryptography objects, no X509)."""

    def __init__(self, cert: ServerCert) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.use_certificate(x509.load_pem_x509_certificate(cert.cert_pem))
        key = serialization.load_pem_private_key(cert.key_pem, password=None)
        self._context.use_privatekey(key)  # type: ignore[arg-type]

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def start_https_origin(cert: ServerCert, host: str = "127.0.0.1") -> HTTPSOrigin:
    """A counting HTTPS origin on 127.0.0.1:0 presenting ``cert``.

    Routes are added as on the plain origin (``origin.static(path, body, headers)``);
    ``host`` is the name its URLs use (``localhost`` to test a DNS name).
    """
    origin = HTTPSOrigin(host=host)
    site = _CountingSite(origin)
    site.noisy = False
    origin.port = reactor.listenSSL(
        0, site, _ServerOptions(cert), interface="127.0.0.1"
    )
    return origin


def start_raw_https_origin(cert: ServerCert, script: Any) -> RawOrigin:
    """The scripted raw origin of tests/support.py over TLS, presenting ``cert``;
    ``script(transport, head)`` answers each request."""
    origin = RawOrigin(script)
    factory = protocol.Factory.forProtocol(lambda: _RawOriginProtocol(origin))
    factory.noisy = False
    origin.port = reactor.listenSSL(
        0, factory, _ServerOptions(cert), interface="127.0.0.1"
    )
    return origin


class TunnelResponse(NamedTuple):
    """What a client saw through a CONNECT tunnel, TLS inside."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    peer_cert_der: bytes

    def header(self, name: str) -> str | None:
        """The field's values joined, or None."""
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


_DEFAULT: Any = object()


class _TunnelConnection(http.client.HTTPSConnection):
    """An HTTPSConnection through a CONNECT tunnel with a chosen SNI name.

    ``server_hostname`` None sends no SNI and checks the chain but not the name.
    """

    def __init__(self, *args: Any, server_hostname: str | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._server_hostname = server_hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP to the proxy, then CONNECT
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self._server_hostname
        )


def _client_context(cafile: Path | str, check_hostname: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = check_hostname
    context.set_alpn_protocols(["http/1.1"])
    return context


def fetch_via_connect_blocking(
    proxy_port: int,
    host: str,
    port: int,
    path: str = "/",
    cafile: Path | str | None = None,
    server_hostname: str | None = _DEFAULT,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> TunnelResponse:
    """CONNECT host:port through the proxy at 127.0.0.1, then one request over TLS.

    The client trusts only ``cafile`` and sends ``server_hostname`` as SNI
    (default ``host``; None for no SNI). Blocking: call it in a thread.
    """
    if server_hostname is _DEFAULT:
        server_hostname = host
    assert cafile is not None, "a client that trusts nothing cannot verify"
    context = _client_context(cafile, check_hostname=server_hostname is not None)
    connection = _TunnelConnection(
        "127.0.0.1",
        proxy_port,
        timeout=timeout,
        context=context,
        server_hostname=server_hostname,
    )
    try:
        connection.set_tunnel(host, port)
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        assert isinstance(connection.sock, ssl.SSLSocket)
        der = connection.sock.getpeercert(binary_form=True) or b""
        return TunnelResponse(response.status, response.getheaders(), body, der)
    finally:
        connection.close()


def fetch_via_connect(
    proxy_port: int,
    host: str,
    port: int,
    path: str = "/",
    cafile: Path | str | None = None,
    server_hostname: str | None = _DEFAULT,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> defer.Deferred[TunnelResponse]:
    """``fetch_via_connect_blocking`` in a thread, to await from a test.

    Every socket operation is bounded by ``timeout`` seconds, so the Deferred
    always fires.
    """
    return threads.deferToThread(
        fetch_via_connect_blocking,
        proxy_port,
        host,
        port,
        path,
        cafile,
        server_hostname,
        method,
        headers,
        timeout,
    )


class Handshake(NamedTuple):
    """What a TLS client saw of a server."""

    peer_cert_der: bytes
    alpn: str | None
    version: str | None
    data: bytes


def tls_handshake_blocking(
    port: int,
    cafile: Path | str,
    server_hostname: str | None,
    alpn: Sequence[str] | None = ("http/1.1",),
    read: int = 0,
    maximum_version: ssl.TLSVersion | None = None,
    timeout: float = TIMEOUT,
) -> Handshake:
    """A TLS handshake with 127.0.0.1:port, then ``read`` bytes of what it sends.

    Verifies the chain against ``cafile`` and, when ``server_hostname`` is given,
    the name too (which is then also sent as SNI; None sends no SNI).
    """
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = server_hostname is not None
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    if maximum_version is not None:
        context.maximum_version = maximum_version
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            der = tls.getpeercert(binary_form=True) or b""
            data = b""
            while len(data) < read:
                chunk = tls.recv(read - len(data))
                if not chunk:
                    break
                data += chunk
            return Handshake(der, tls.selected_alpn_protocol(), tls.version(), data)


def tls_handshake(
    port: int,
    cafile: Path | str,
    server_hostname: str | None,
    alpn: Sequence[str] | None = ("http/1.1",),
    read: int = 0,
    maximum_version: ssl.TLSVersion | None = None,
    timeout: float = TIMEOUT,
) -> defer.Deferred[Handshake]:
    """``tls_handshake_blocking`` in a thread, to await from a test."""
    return threads.deferToThread(
        tls_handshake_blocking,
        port,
        cafile,
        server_hostname,
        alpn,
        read,
        maximum_version,
        timeout,
    )


class _BodyCollector(protocol.Protocol):
    """Collects a response body; ``done`` fires with it, or fails if truncated."""

    def __init__(self) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


async def agent_get(
    agent: Any, url: str, timeout: float = TIMEOUT
) -> tuple[int, bytes]:
    """GET ``url`` with a Twisted Agent: (status, body), within ``timeout`` seconds."""
    request = agent.request(b"GET", url.encode("ascii"))
    request.addTimeout(timeout, reactor)
    response = await request
    collector = _BodyCollector()
    response.deliverBody(collector)
    collector.done.addTimeout(timeout, reactor)
    return response.code, await collector.done
