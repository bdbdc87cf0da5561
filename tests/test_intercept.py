"""Tests for TLS interception: host patterns, the client side's TLS, origin checks."""

from __future__ import annotations

import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import DNSMismatch
from service_identity.hazmat import DNS_ID
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import Agent

from cacheproxy import intercept
from cacheproxy.ca import Authority, init_ca, leaf_for
from cacheproxy.intercept import (
    Interceptor,
    check_pattern,
    describe_tls_failure,
    matches,
    origin_tls_policy,
)
from tests.conftest import start_proxy
from tests.tls_support import (
    Handshake,
    HTTPSOrigin,
    ServerCert,
    TestCA,
    agent_get,
    fetch_via_connect,
    issue_server_cert,
    make_test_ca,
    start_https_origin,
    tls_handshake,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
VERIFY_FAILED = "certificate verify failed"


# ---------------------------------------------------------------------------
# --intercept patterns
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, host, expected",
    [
        ("*", "pypi.org", True),
        ("*", "10.0.0.1", True),
        ("*", "[2001:db8::1]", True),
        ("*.example.org", "a.example.org", True),
        ("*.example.org", "a.b.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "badexample.org", False),
        ("*.example.org", "example.org.evil.test", False),
        ("*.example.org", "A.Example.ORG.", True),
        ("*.Example.ORG", "a.example.org", True),
        ("pypi.org", "pypi.org", True),
        ("pypi.org", "PyPI.org", True),
        ("pypi.org", "pypi.org.", True),
        ("pypi.org", "www.pypi.org", False),
        ("pypi.org", "pypi.org.evil.test", False),
        ("10.0.0.5", "10.0.0.5", True),
        ("10.0.0.5", "10.0.0.50", False),
        ("::1", "[::1]", True),
        ("[::1]", "::1", True),
        ("2001:db8::1", "[2001:DB8:0:0::1]", True),
        ("*.0.0.1", "127.0.0.1", False),
        ("*", "", False),
    ],
)
def test_matches(pattern: str, host: str, expected: bool):
    """HOST_PATTERN: * all, *.d below d only, else one name or address exactly."""
    assert matches([pattern], host) is expected


def test_matches_any_of_several_patterns():
    """A host is intercepted if any one of the patterns matches it."""
    patterns = ["pypi.org", "*.pythonhosted.org"]
    assert matches(patterns, "files.pythonhosted.org")
    assert matches(patterns, "pypi.org")
    assert not matches(patterns, "github.com")
    assert not matches([], "pypi.org")


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("*", "*"),
        (" PyPI.org. ", "pypi.org"),
        ("*.PythonHosted.org", "*.pythonhosted.org"),
        ("*.org", "*.org"),
        ("registry-1.docker.io", "registry-1.docker.io"),
        ("10.0.0.5", "10.0.0.5"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("2001:db8:0::1", "2001:db8::1"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_check_pattern_accepts(text: str, canonical: str):
    """A valid pattern comes back in canonical form (lower case, IDNA, no dot)."""
    assert check_pattern(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "a*b",
        "*.",
        "**",
        "*.*.org",
        "*example.org",
        "pypi.*",
        "pypi.org:443",
        "http://pypi.org",
        "foo..bar",
        "-bad.org",
        "*.10.0.0.5",
        "a" * 64 + ".org",
    ],
)
def test_check_pattern_refuses(text: str):
    """An invalid pattern is a ValueError whose message quotes it."""
    with pytest.raises(ValueError) as raised:
        check_pattern(text)
    message = str(raised.value)
    assert "--intercept" in message or repr(text.strip()) in message


# ---------------------------------------------------------------------------
# The client side: Interceptor behind a real TLS listener
# ---------------------------------------------------------------------------


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    """cacheproxy's CA, fresh in tmp_path."""
    return init_ca(tmp_path / "ca", now=datetime.now(UTC), hostname="testhost")


@pytest.fixture
def cafile(authority: Authority) -> Path:
    """The CA certificate the test clients trust."""
    return authority.directory / "ca.pem"


class _Intercepting(protocol.Protocol):
    """Starts server-side TLS at once, as the proxy does after answering CONNECT."""

    def __init__(self, interceptor: Interceptor, connect_host: str) -> None:
        self._interceptor = interceptor
        self._connect_host = connect_host

    def connectionMade(self) -> None:
        self.transport.startTLS(self._interceptor.creator_for(self._connect_host))
        self.transport.write(b"hello")


class InterceptingServer:
    """A TLS listener on 127.0.0.1:0 that intercepts as if CONNECTed to a host."""

    def __init__(self, interceptor: Interceptor, connect_host: str) -> None:
        factory = protocol.Factory.forProtocol(
            lambda: _Intercepting(interceptor, connect_host)
        )
        factory.noisy = False
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port: int = self.listening.getHost().port


@pytest_twisted.async_yield_fixture
async def serve(
    authority: Authority,
) -> AsyncIterator[Callable[..., InterceptingServer]]:
    """Start intercepting servers; all stop listening at teardown."""
    servers: list[InterceptingServer] = []

    def start(
        connect_host: str, interceptor: Interceptor | None = None
    ) -> InterceptingServer:
        chosen = interceptor or Interceptor(authority, lambda: datetime.now(UTC))
        server = InterceptingServer(chosen, connect_host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await defer.maybeDeferred(server.listening.stopListening)


def names_in(der: bytes) -> list[str]:
    """The DNS names and addresses a certificate's subjectAltName holds."""
    certificate = x509.load_der_x509_certificate(der)
    alternatives = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    dns = alternatives.get_values_for_type(x509.DNSName)
    return dns + [str(a) for a in alternatives.get_values_for_type(x509.IPAddress)]


@pytest_twisted.ensureDeferred
async def test_presents_a_certificate_for_the_sni_name(serve: Any, cafile: Path):
    """With SNI, the client gets (and verifies) a certificate for the name it sent."""
    server = serve("connect.example")
    seen = await tls_handshake(server.port, cafile, "sni.example", read=5)
    assert names_in(seen.peer_cert_der) == ["sni.example"]
    assert seen.data == b"hello"


@pytest_twisted.ensureDeferred
async def test_without_sni_presents_the_connect_host(serve: Any, cafile: Path):
    """Without SNI, the certificate is for the CONNECT host."""
    server = serve("connect.example")
    seen = await tls_handshake(server.port, cafile, None, read=5)
    assert names_in(seen.peer_cert_der) == ["connect.example"]
    assert seen.data == b"hello"


@pytest_twisted.ensureDeferred
async def test_connect_to_an_ip_address(serve: Any, cafile: Path):
    """A CONNECT to an IP literal (no SNI sent) gets a certificate for that address."""
    server = serve("127.0.0.1")
    seen = await tls_handshake(server.port, cafile, "127.0.0.1")
    assert names_in(seen.peer_cert_der) == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_malformed_sni_falls_back_to_the_connect_host(serve: Any, cafile: Path):
    """An SNI name that is no valid host name keeps the CONNECT host's certificate."""
    server = serve("connect.example")
    seen = await tls_handshake(server.port, cafile, None, read=5)
    malformed = await tls_handshake_unchecked(server.port, cafile, "-bad-.example")
    assert names_in(malformed.peer_cert_der) == names_in(seen.peer_cert_der)


@pytest_twisted.ensureDeferred
async def test_sni_not_intercepted_falls_back(
    serve: Any, authority: Authority, cafile: Path
):
    """An SNI name outside the --intercept patterns gets no certificate of its own."""
    interceptor = Interceptor(authority, lambda: NOW, patterns=["*.example.org"])
    server = serve("a.example.org", interceptor)
    chosen = await tls_handshake_unchecked(server.port, cafile, "b.example.org")
    refused = await tls_handshake_unchecked(server.port, cafile, "bank.test")
    assert names_in(chosen.peer_cert_der) == ["b.example.org"]
    assert names_in(refused.peer_cert_der) == ["a.example.org"]
    assert not (authority.directory / "leaf" / "bank.test.pem").exists()


def tls_handshake_unchecked(port: int, cafile: Path, sni: str) -> Any:
    """A handshake sending SNI ``sni`` that checks the chain but not the name."""

    def run() -> Handshake:
        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                der = tls.getpeercert(binary_form=True) or b""
                return Handshake(der, tls.selected_alpn_protocol(), tls.version(), b"")

    return threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_alpn_negotiates_http_1_1(serve: Any, cafile: Path):
    """A client offering h2 and http/1.1 gets http/1.1."""
    server = serve("connect.example")
    seen = await tls_handshake(
        server.port, cafile, "connect.example", alpn=["h2", "http/1.1"]
    )
    assert seen.alpn == "http/1.1"


@pytest_twisted.ensureDeferred
async def test_h2_only_client_gets_no_protocol(serve: Any, cafile: Path):
    """A client offering only h2 completes the handshake with no ALPN protocol."""
    server = serve("connect.example")
    seen = await tls_handshake(server.port, cafile, "connect.example", alpn=["h2"])
    assert seen.alpn is None


@pytest_twisted.ensureDeferred
async def test_tls_1_2_is_accepted(serve: Any, cafile: Path):
    """A client that speaks at most TLS 1.2 is served (the minimum we accept)."""
    server = serve("connect.example")
    seen = await tls_handshake(
        server.port,
        cafile,
        "connect.example",
        maximum_version=ssl.TLSVersion.TLSv1_2,
        read=5,
    )
    assert seen.version == "TLSv1.2"
    assert seen.data == b"hello"


def test_tls_below_1_2_is_refused(authority: Authority):
    """A TLS 1.1 client fails against the interceptor but not against a lax server."""
    interceptor = Interceptor(authority, lambda: NOW)
    ours = interceptor.creator_for("connect.example").serverConnectionForTLS(
        None  # type: ignore[arg-type]
    )
    assert handshake_in_memory(ours, old_client(SSL.TLS1_1_VERSION)) is None
    ours = interceptor.creator_for("connect.example").serverConnectionForTLS(
        None  # type: ignore[arg-type]
    )
    assert handshake_in_memory(ours, old_client(SSL.TLS1_2_VERSION)) == "TLSv1.2"
    lax = SSL.Context(SSL.TLS_METHOD)
    lax.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    lax.set_min_proto_version(SSL.TLS1_VERSION)
    cert_pem, key_pem = leaf_for(authority, "connect.example", now=NOW)
    lax.use_certificate(x509.load_pem_x509_certificate(cert_pem))
    lax.use_privatekey(serialization.load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
    control = handshake_in_memory(
        SSL.Connection(lax, None), old_client(SSL.TLS1_1_VERSION)
    )
    assert control == "TLSv1.1"


def old_client(newest: int) -> SSL.Connection:
    """A client willing to speak TLS 1.0 up to ``newest``, weak ciphers allowed."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.set_min_proto_version(SSL.TLS1_VERSION)
    context.set_max_proto_version(newest)
    return SSL.Connection(context, None)


def handshake_in_memory(server: SSL.Connection, client: SSL.Connection) -> str | None:
    """The protocol version two connections agree on through memory BIOs, or None."""
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(20):
        done = True
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                done = False
            except SSL.Error:
                return None
        for source, sink in ((client, server), (server, client)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done:
            return client.get_protocol_version_name()
    raise AssertionError("the handshake did not finish in 20 rounds")


@pytest_twisted.ensureDeferred
async def test_repeat_connection_reuses_the_loaded_certificate(
    serve: Any, authority: Authority, cafile: Path, monkeypatch: pytest.MonkeyPatch
):
    """A second connection to a host costs no leaf_for call and gets the same cert."""
    calls: list[str] = []
    real = intercept.leaf_for

    def counting(*args: Any, **kwargs: Any) -> tuple[bytes, bytes]:
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(intercept, "leaf_for", counting)
    server = serve("connect.example")
    first = await tls_handshake(server.port, cafile, "sni.example")
    second = await tls_handshake(server.port, cafile, "sni.example")
    assert first.peer_cert_der == second.peer_cert_der
    assert calls == ["connect.example", "sni.example"]


@pytest_twisted.ensureDeferred
async def test_leaf_files_are_private_and_survive_a_restart(
    serve: Any, authority: Authority, cafile: Path
):
    """Host certificates land in leaf/ (0600 in a 0700 dir) and are reused later."""
    first = await tls_handshake(serve("connect.example").port, cafile, None)
    leaf = authority.directory / "leaf" / "connect.example.pem"
    assert stat.S_IMODE(leaf.stat().st_mode) == 0o600
    assert stat.S_IMODE(leaf.parent.stat().st_mode) == 0o700
    fresh = Interceptor(authority, lambda: datetime.now(UTC))
    again = await tls_handshake(serve("connect.example", fresh).port, cafile, None)
    assert again.peer_cert_der == first.peer_cert_der


def test_renews_a_certificate_near_its_expiry(authority: Authority):
    """A loaded certificate is replaced once within a day of its expiry."""
    clock = [datetime.now(UTC)]
    interceptor = Interceptor(authority, lambda: clock[0])
    first = interceptor.load("renew.example")
    assert interceptor.load("renew.example") is first
    clock[0] = first.renew_at + timedelta(seconds=1)
    renewed = interceptor.load("renew.example")
    assert renewed is not first
    assert renewed.renew_at > first.renew_at


def test_forgets_the_least_recently_used_host(authority: Authority):
    """Past max_hosts, the least recently used host's loaded certificate goes."""
    interceptor = Interceptor(authority, lambda: NOW, max_hosts=2)
    a = interceptor.load("a.example")
    interceptor.load("b.example")
    assert interceptor.load("a.example") is a
    interceptor.load("c.example")
    assert interceptor.load("a.example") is a
    assert len(interceptor._loaded) == 2
    assert "b.example" not in interceptor._loaded


def test_creator_for_refuses_a_malformed_host(authority: Authority):
    """A CONNECT host that is no name or address fails before any handshake."""
    interceptor = Interceptor(authority, lambda: NOW)
    with pytest.raises(ValueError):
        interceptor.creator_for("bad host!")


# ---------------------------------------------------------------------------
# The origin side: origin_tls_policy and describe_tls_failure
# ---------------------------------------------------------------------------


@pytest.fixture
def origin_ca(tmp_path: Path) -> TestCA:
    """The test CA that signs origin certificates (not cacheproxy's CA)."""
    return make_test_ca(tmp_path / "origin-ca")


@pytest_twisted.async_yield_fixture
async def https_origin() -> AsyncIterator[Callable[..., HTTPSOrigin]]:
    """Start HTTPS origins serving /x; all stop listening at teardown."""
    origins: list[HTTPSOrigin] = []

    def start(cert: ServerCert, host: str = "127.0.0.1") -> HTTPSOrigin:
        origin = start_https_origin(cert, host=host)
        origin.static("/x", b"secret body\n", {"Cache-Control": "max-age=3600"})
        origins.append(origin)
        return origin

    yield start
    for origin in origins:
        await origin.stop()


async def refusal(policy: Any, url: str) -> str | None:
    """Request ``url`` expecting a TLS failure; describe_tls_failure's reason."""
    with pytest.raises(ResponseNeverReceived) as raised:
        await agent_get(Agent(reactor, policy), url)
    return describe_tls_failure(raised.value)


@pytest_twisted.ensureDeferred
async def test_origin_signed_by_upstream_ca_is_accepted(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """With --upstream-ca naming the origin's CA, a request succeeds."""
    origin = https_origin(issue_server_cert(origin_ca, tmp_path))
    agent = Agent(reactor, origin_tls_policy(origin_ca.pem))
    assert await agent_get(agent, origin.url("/x")) == (200, b"secret body\n")
    origin.host = "localhost"
    assert await agent_get(agent, origin.url("/x")) == (200, b"secret body\n")
    assert origin.count("/x") == 2


@pytest_twisted.ensureDeferred
async def test_upstream_ca_file_may_hold_several_certificates(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """Every certificate in the --upstream-ca file is trusted, not only the first."""
    other = make_test_ca(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.pem.read_bytes() + origin_ca.pem.read_bytes())
    origin = https_origin(issue_server_cert(origin_ca, tmp_path))
    agent = Agent(reactor, origin_tls_policy(bundle))
    assert await agent_get(agent, origin.url("/x")) == (200, b"secret body\n")


@pytest_twisted.ensureDeferred
async def test_system_store_is_used_without_upstream_ca(
    https_origin: Any,
    origin_ca: TestCA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Without --upstream-ca the system store decides (here SSL_CERT_FILE's CA)."""
    origin = https_origin(issue_server_cert(origin_ca, tmp_path))
    reason = await refusal(origin_tls_policy(None), origin.url("/x"))
    assert reason == (
        "the origin's certificate failed verification: certificate verify failed"
        " (unable to get local issuer certificate)"
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(origin_ca.pem))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    agent = Agent(reactor, origin_tls_policy(None))
    assert await agent_get(agent, origin.url("/x")) == (200, b"secret body\n")


@pytest_twisted.ensureDeferred
async def test_self_signed_origin_is_refused_with_a_reason(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """A self-signed origin certificate fails; the reason says self-signed."""
    origin = https_origin(issue_server_cert(None, tmp_path))
    reason = await refusal(origin_tls_policy(origin_ca.pem), origin.url("/x"))
    assert reason == (
        "the origin's certificate failed verification: certificate verify failed"
        " (self-signed certificate)"
    )
    assert origin.count("/x") == 0


@pytest_twisted.ensureDeferred
async def test_origin_from_another_ca_is_refused(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """A certificate from a CA outside the trust store fails: unknown issuer."""
    stranger = make_test_ca(tmp_path / "stranger")
    origin = https_origin(issue_server_cert(stranger, tmp_path))
    reason = await refusal(origin_tls_policy(origin_ca.pem), origin.url("/x"))
    assert reason is not None
    assert "unable to get local issuer certificate" in reason


@pytest_twisted.ensureDeferred
async def test_host_mismatch_is_refused_with_a_reason(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """A valid chain for another name fails, for an IP and for a DNS name."""
    cert = issue_server_cert(origin_ca, tmp_path, names=["other.example"], addresses=[])
    origin = https_origin(cert)
    policy = origin_tls_policy(origin_ca.pem)
    ip_reason = await refusal(policy, origin.url("/x"))
    origin.host = "localhost"
    dns_reason = await refusal(policy, origin.url("/x"))
    assert ip_reason == "the origin's certificate does not match 127.0.0.1"
    assert dns_reason == "the origin's certificate does not match localhost"
    assert origin.count("/x") == 0


@pytest_twisted.ensureDeferred
async def test_certificate_without_subject_alt_name_is_refused(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """A certificate naming its host only in the CN fails (Twisted alone accepts it)."""
    cert = issue_server_cert(
        origin_ca, tmp_path, names=[], addresses=[], common_name="127.0.0.1"
    )
    origin = https_origin(cert)
    reason = await refusal(origin_tls_policy(origin_ca.pem), origin.url("/x"))
    assert reason == (
        "the origin's certificate names no host (it has no subjectAltName)"
    )
    assert origin.count("/x") == 0


def test_upstream_ca_that_cannot_be_read_is_a_clear_error(tmp_path: Path):
    """A missing --upstream-ca file is a ValueError naming it."""
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="missing.pem"):
        origin_tls_policy(missing)


def test_upstream_ca_without_certificates_is_a_clear_error(tmp_path: Path):
    """A file with no certificate is a ValueError naming it, never quoting it."""
    path = tmp_path / "key-not-cert.pem"
    path.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nU0VDUkVU\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(ValueError) as raised:
        origin_tls_policy(path)
    assert str(path) in str(raised.value)
    assert "U0VDUkVU" not in str(raised.value)


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            ResponseNeverReceived(
                [
                    Failure(
                        SSL.Error([("SSL routines", "", "certificate verify failed")])
                    )
                ]
            ),
            "the origin's certificate failed verification: certificate verify failed",
        ),
        (
            ResponseNeverReceived(
                [
                    Failure(
                        VerificationError(
                            errors=[DNSMismatch(mismatched_id=DNS_ID("pypi.org"))]
                        )
                    )
                ]
            ),
            "the origin's certificate does not match pypi.org",
        ),
        (
            ResponseNeverReceived(
                [Failure(SSL.Error([("SSL routines", "", "wrong version number")]))]
            ),
            None,
        ),
        (ConnectionRefusedError(), None),
        (ResponseNeverReceived([Failure(ConnectionRefusedError())]), None),
        (ValueError("certificate verify failed"), None),
    ],
)
def test_describe_tls_failure(error: BaseException, expected: str | None):
    """What Twisted's own policy raises is described too; other failures give None."""
    assert describe_tls_failure(error) == expected
    assert describe_tls_failure(Failure(error)) == expected


@pytest_twisted.ensureDeferred
async def test_blind_tunnel_shows_the_origins_own_certificate(
    https_origin: Any, origin_ca: TestCA, tmp_path: Path
):
    """Through today's blind CONNECT tunnel the client sees the origin's certificate."""
    cert = issue_server_cert(origin_ca, tmp_path)
    origin = https_origin(cert)
    port = origin.port.getHost().port
    running = await start_proxy(tmp_path, connect_ports=frozenset({port}))
    try:
        seen = await fetch_via_connect(
            running.port, "localhost", port, "/x", cafile=origin_ca.pem
        )
        by_ip = await fetch_via_connect(
            running.port, "127.0.0.1", port, "/x", cafile=origin_ca.pem
        )
    finally:
        await running.service.stopService()
    assert (seen.status, seen.body) == (200, b"secret body\n")
    assert seen.header("Cache-Control") == "max-age=3600"
    assert seen.peer_cert_der == cert.der
    assert by_ip.peer_cert_der == cert.der
    assert origin.count("/x") == 2
