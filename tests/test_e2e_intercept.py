"""HTTPS interception end to end (issue 7): a client trusting the proxy's CA, the
proxy terminating its TLS, and a local HTTPS origin verified against a test CA."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import ssl
import sys
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer, reactor, task, utils
from twisted.python import usage

from cacheproxy import collapse
from cacheproxy.ca import init_ca
from cacheproxy.options import Options
from tests.conftest import RunningProxy, start_proxy
from tests.support import wait_for
from tests.tls_support import (
    HTTPSOrigin,
    ServerCert,
    TestCA,
    fetch_via_connect,
    issue_server_cert,
    make_test_ca,
    start_https_origin,
    start_raw_https_origin,
)

BODY = bytes(range(256)) * 40


@dataclass
class Setup:
    """A trusted HTTPS origin, the proxy's CA and the origin side's test CA."""

    origin: HTTPSOrigin
    origin_ca: TestCA
    origin_cert: ServerCert
    ca_dir: Path
    ca_pem: Path


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    origin_ca = make_test_ca(tmp_path / "origin-ca")
    cert = issue_server_cert(origin_ca, tmp_path / "origin-cert")
    origin = start_https_origin(cert, host="localhost")
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, now=datetime.now(UTC))
    yield Setup(origin, origin_ca, cert, ca_dir, ca_dir / "ca.pem")
    await origin.stop()


async def _proxy(tmp_path: Path, setup: Setup, **overrides: object) -> RunningProxy:
    settings: dict[str, object] = {
        "intercept": ("localhost",),
        "ca_dir": str(setup.ca_dir),
        "upstream_ca": str(setup.origin_ca.pem),
        # The test origins listen on ephemeral ports.
        "connect_ports": frozenset(range(1024, 65536)),
    }
    settings.update(overrides)
    return await start_proxy(tmp_path, **settings)


def _issuer(der: bytes) -> str:
    certificate = x509.load_der_x509_certificate(der)
    return certificate.issuer.rfc4514_string()


@pytest_twisted.ensureDeferred
async def test_intercepted_https_is_cached(tmp_path: Path, setup: Setup):
    """A CONNECT to an intercepted host is answered with the proxy's certificate,
    and its https:// responses are stored and served byte-exact from the store."""
    setup.origin.static("/pkg.whl", BODY, {"Cache-Control": "max-age=600"})
    proxy = await _proxy(tmp_path, setup)
    try:
        port = setup.origin.port.getHost().port
        first = await fetch_via_connect(
            proxy.port, "localhost", port, "/pkg.whl", cafile=setup.ca_pem
        )
        second = await fetch_via_connect(
            proxy.port, "localhost", port, "/pkg.whl", cafile=setup.ca_pem
        )
    finally:
        await proxy.service.stopService()
    assert (first.status, second.status) == (200, 200)
    assert first.body == second.body == BODY
    assert setup.origin.count("/pkg.whl") == 1
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert "cacheproxy" in _issuer(first.peer_cert_der)
    log = proxy.access_log.read_text()
    assert f"https://localhost:{port}/pkg.whl" in log
    assert f"CONNECT localhost:{port}" in log


@pytest_twisted.ensureDeferred
async def test_untrusted_origin_certificate_is_502(tmp_path: Path, setup: Setup):
    """An origin whose certificate fails verification is a 502 saying why, inside
    the client's TLS session; nothing is stored."""
    rogue = start_https_origin(
        issue_server_cert(None, tmp_path / "rogue", stem="rogue"), host="localhost"
    )
    rogue.static("/x", b"secret", {"Cache-Control": "max-age=600"})
    proxy = await _proxy(tmp_path, setup)
    try:
        port = rogue.port.getHost().port
        reply = await fetch_via_connect(
            proxy.port, "localhost", port, "/x", cafile=setup.ca_pem
        )
    finally:
        await proxy.service.stopService()
        await rogue.stop()
    assert reply.status == 502
    assert b"certificate" in reply.body
    assert b"secret" not in reply.body
    assert reply.header("Cache-Status") == "cacheproxy; fwd=miss; detail=origin-error"
    assert rogue.count("/x") == 0


@pytest_twisted.ensureDeferred
async def test_host_mismatch_is_502(tmp_path: Path, setup: Setup):
    """A trusted certificate for another name is refused (RFC 9110 section 4.3.4)."""
    other = issue_server_cert(
        setup.origin_ca, tmp_path / "other", names=("other.test",), addresses=()
    )
    wrong = start_https_origin(other, host="localhost")
    wrong.static("/x", b"x")
    proxy = await _proxy(tmp_path, setup)
    try:
        reply = await fetch_via_connect(
            proxy.port,
            "localhost",
            wrong.port.getHost().port,
            "/x",
            cafile=setup.ca_pem,
        )
    finally:
        await proxy.service.stopService()
        await wrong.stop()
    assert reply.status == 502
    assert b"localhost" in reply.body


@pytest_twisted.ensureDeferred
async def test_other_hosts_are_tunnelled_blind(tmp_path: Path, setup: Setup):
    """A host that matches no --intercept pattern gets a plain tunnel: the client
    sees the origin's own certificate and the proxy stores nothing."""
    setup.origin.static("/t", b"tunnelled", {"Cache-Control": "max-age=600"})
    proxy = await _proxy(tmp_path, setup, intercept=("*.example.org",))
    try:
        reply = await fetch_via_connect(
            proxy.port,
            "localhost",
            setup.origin.port.getHost().port,
            "/t",
            cafile=setup.origin_ca.pem,
        )
    finally:
        await proxy.service.stopService()
    assert reply.status == 200
    assert reply.body == b"tunnelled"
    assert reply.peer_cert_der == setup.origin_cert.der
    assert reply.header("Cache-Status") is None


@pytest_twisted.ensureDeferred
async def test_intercept_keeps_to_the_connect_ports(tmp_path: Path, setup: Setup):
    """--intercept widens nothing: a CONNECT to an intercepted host on a port that
    --connect-ports does not allow is refused with 403, before any TLS."""
    setup.origin.static("/p", b"never", {"Cache-Control": "max-age=600"})
    port = setup.origin.port.getHost().port
    proxy = await _proxy(tmp_path, setup, connect_ports=frozenset({443}))
    try:
        with pytest.raises(OSError, match="403"):
            await fetch_via_connect(
                proxy.port, "localhost", port, "/p", cafile=setup.ca_pem
            )
    finally:
        await proxy.service.stopService()
    assert setup.origin.count("/p") == 0
    log = proxy.access_log.read_text()
    assert "TCP_DENIED/403 " in log and f" CONNECT localhost:{port} " in log


@pytest_twisted.ensureDeferred
async def test_collapsed_follower_over_tls_waits_quietly(
    tmp_path: Path, setup: Setup, monkeypatch: pytest.MonkeyPatch
):
    """Two clients miss the same https URL at once: the second follows the first's
    fetch.  While it has caught up with a stalled origin it is not asked for data
    over and over (a busy loop that held the CPU, seen with curl), and both get the
    whole body once the origin goes on."""
    first_half, second_half = BODY[: len(BODY) // 2], BODY[len(BODY) // 2 :]
    transports: list = []
    raw = start_raw_https_origin(
        setup.origin_cert, lambda t, head: transports.append(t)
    )
    asked = 0
    caught_up_at: list[int] = []
    resume, listen = collapse.Tail.resumeProducing, collapse.Flight.listen

    def counting(self: collapse.Tail) -> None:
        nonlocal asked
        asked += 1
        resume(self)

    def noting(self: collapse.Flight, listener: Callable[[], None]) -> None:
        # A follower listens for progress when it has sent all the file holds.
        caught_up_at.append(self.size)
        listen(self, listener)

    monkeypatch.setattr(collapse.Tail, "resumeProducing", counting)
    monkeypatch.setattr(collapse.Flight, "listen", noting)
    proxy = await _proxy(tmp_path, setup)
    port = raw.port.getHost().port
    url = f"https://localhost:{port}/big"
    flights = proxy.service.proxy.flights
    try:
        pending = [
            fetch_via_connect(
                proxy.port, "localhost", port, "/big", cafile=setup.ca_pem
            )
            for _ in range(2)
        ]
        await wait_for(lambda: len(transports) == 1)
        await wait_for(lambda: sum(f.followers for f in flights.values()) == 1)
        transports[0].write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(BODY), first_half)
        )
        await wait_for(lambda: len(first_half) in caught_up_at)
        # The follower has everything the origin sent; let the reactor turn a
        # while and see how often it is asked for more.
        before = asked
        for _ in range(20):
            await task.deferLater(reactor, 0, lambda: None)
        quiet = asked - before
        transports[0].write(second_half)
        responses = await defer.gatherResults(pending)
    finally:
        await proxy.service.stopService()
        await raw.stop()
    assert quiet <= 2, f"a caught-up follower was asked for data {quiet} times"
    assert [r.body for r in responses] == [BODY, BODY]
    statuses = sorted(r.header("Cache-Status") or "" for r in responses)
    assert statuses == [
        "cacheproxy; fwd=miss; collapsed",
        "cacheproxy; fwd=miss; stored",
    ]
    assert len(raw.requests) == 1
    assert url in proxy.access_log.read_text()


@pytest_twisted.ensureDeferred
async def test_offline_replays_intercepted_https(tmp_path: Path, setup: Setup):
    """--offline accepts CONNECTs to intercepted hosts and answers from the store,
    with the origin gone."""
    setup.origin.static("/demo", b"demo page", {"Cache-Control": "max-age=0"})
    port = setup.origin.port.getHost().port
    online = await _proxy(tmp_path, setup, record=True)
    try:
        await fetch_via_connect(
            online.port, "localhost", port, "/demo", cafile=setup.ca_pem
        )
    finally:
        await online.service.stopService()
    await setup.origin.stop()
    offline = await _proxy(tmp_path, setup, offline=True)
    try:
        reply = await fetch_via_connect(
            offline.port, "localhost", port, "/demo", cafile=setup.ca_pem
        )
        missing = await fetch_via_connect(
            offline.port, "localhost", port, "/never", cafile=setup.ca_pem
        )
    finally:
        await offline.service.stopService()
    assert (reply.status, reply.body) == (200, b"demo page")
    assert missing.status == 504
    assert setup.origin.count("/demo") == 1


def test_intercept_without_a_ca_is_a_usage_error(tmp_path: Path):
    """--intercept refuses to start without the local CA, naming the directory."""
    options = Options()
    with pytest.raises(usage.UsageError, match="no CA in"):
        options.parseOptions(
            ["--intercept", "pypi.org", "--ca-dir", str(tmp_path / "none")]
        )


@pytest.mark.parametrize("pattern", ["", "a*b", "*.", "http://pypi.org"])
def test_bad_intercept_pattern_is_a_usage_error(pattern: str):
    """A malformed --intercept pattern is refused with the option named."""
    with pytest.raises(usage.UsageError, match="--intercept"):
        Options().parseOptions(["--intercept", pattern])


def test_unreadable_upstream_ca_is_a_usage_error(tmp_path: Path):
    """--upstream-ca must name a PEM file holding certificates."""
    (tmp_path / "empty.pem").write_text("nothing here\n")
    for path in (tmp_path / "missing.pem", tmp_path / "empty.pem"):
        with pytest.raises(usage.UsageError, match="--upstream-ca"):
            Options().parseOptions(["--upstream-ca", str(path)])


def _wheel() -> bytes:
    """A minimal valid wheel of ``demo-pkg 1.0`` (PEP 427)."""
    files = {
        "demo_pkg/__init__.py": b"VALUE = 1\n",
        "demo_pkg-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n"
        ),
        "demo_pkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cacheproxy-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(data)}")
    record.append("demo_pkg-1.0.dist-info/RECORD,,")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("demo_pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buffer.getvalue()


@pytest_twisted.ensureDeferred
async def test_pip_downloads_through_interception(tmp_path: Path, setup: Setup):
    """pip, trusting the proxy's CA with --cert, downloads a wheel from an HTTPS
    simple index twice; the second time the wheel comes from the store."""
    wheel = _wheel()
    name = "demo_pkg-1.0-py3-none-any.whl"
    digest = hashlib.sha256(wheel).hexdigest()
    index = (
        f'<!DOCTYPE html><html><body><a href="/files/{name}#sha256={digest}">'
        f"{name}</a></body></html>"
    ).encode()
    setup.origin.static(
        "/simple/demo-pkg/",
        index,
        {"Content-Type": "text/html", "Cache-Control": "max-age=600", "ETag": '"i1"'},
    )
    setup.origin.static(
        f"/files/{name}",
        wheel,
        {"Content-Type": "application/octet-stream", "Cache-Control": "max-age=86400"},
    )
    proxy = await _proxy(tmp_path, setup)
    port = setup.origin.port.getHost().port
    try:
        for attempt in (1, 2):
            target = tmp_path / f"download-{attempt}"
            out, err, code = await _run_bounded(
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--dest",
                str(target),
                "--index-url",
                f"https://localhost:{port}/simple/",
                "--cert",
                str(setup.ca_pem),
                "--proxy",
                f"http://127.0.0.1:{proxy.port}",
                "demo-pkg==1.0",
            )
            assert code == 0, (out + err).decode(errors="replace")
            assert (target / name).read_bytes() == wheel
    finally:
        await proxy.service.stopService()
    assert setup.origin.count(f"/files/{name}") == 1
    lines = [
        line
        for line in proxy.access_log.read_text().splitlines()
        if f"https://localhost:{port}/files/{name}" in line
    ]
    assert len(lines) == 2
    assert "TCP_MISS/200" in lines[0]
    assert "_HIT/200" in lines[1]


async def _run_bounded(*argv: str, timeout: float = 120) -> tuple[bytes, bytes, int]:
    """Run a command to completion (killed past ``timeout``), with no proxy, pip or
    CA-bundle settings inherited from the environment (requests lets
    REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE override pip's --cert)."""
    inherited = ("proxy", "pip_", "ca_bundle", "ssl_cert")
    env = {
        key: value
        for key, value in os.environ.items()
        if not any(word in key.lower() for word in inherited)
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    result = utils.getProcessOutputAndValue(argv[0], argv[1:], env=env)
    result.addTimeout(timeout, reactor)
    return await result


@pytest_twisted.ensureDeferred
async def test_client_not_trusting_the_ca_refuses(tmp_path: Path, setup: Setup):
    """A client without the proxy's CA refuses the host certificate: interception
    is visible, never silent, to clients that were not set up for it."""
    setup.origin.static("/x", b"x")
    proxy = await _proxy(tmp_path, setup)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await fetch_via_connect(
                proxy.port,
                "localhost",
                setup.origin.port.getHost().port,
                "/x",
                cafile=setup.origin_ca.pem,
            )
    finally:
        await proxy.service.stopService()
    assert setup.origin.count("/x") == 0


@pytest_twisted.ensureDeferred
async def test_intercepted_https_through_a_parent_proxy(tmp_path: Path, setup: Setup):
    """With --upstream, an intercepted https request reaches its origin through a
    CONNECT tunnel of the parent, and the origin is still verified by this proxy."""
    setup.origin.static("/via-parent", BODY, {"Cache-Control": "max-age=600"})
    rogue = start_https_origin(
        issue_server_cert(None, tmp_path / "rogue", stem="rogue"), host="localhost"
    )
    rogue.static("/x", b"secret")
    parent = await start_proxy(
        tmp_path / "parent", connect_ports=frozenset(range(1024, 65536))
    )
    child = await _proxy(tmp_path / "child", setup, upstream=("127.0.0.1", parent.port))
    port = setup.origin.port.getHost().port
    try:
        first = await fetch_via_connect(
            child.port, "localhost", port, "/via-parent", cafile=setup.ca_pem
        )
        second = await fetch_via_connect(
            child.port, "localhost", port, "/via-parent", cafile=setup.ca_pem
        )
        refused = await fetch_via_connect(
            child.port,
            "localhost",
            rogue.port.getHost().port,
            "/x",
            cafile=setup.ca_pem,
        )
    finally:
        await child.service.stopService()
        await parent.service.stopService()
        await rogue.stop()
    assert first.body == second.body == BODY
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert setup.origin.count("/via-parent") == 1
    assert refused.status == 502 and b"certificate" in refused.body
    assert rogue.count("/x") == 0
    parent_log = parent.access_log.read_text()
    assert "TCP_TUNNEL/200" in parent_log and f"CONNECT localhost:{port}" in parent_log
    assert "FIRSTUP_PARENT/127.0.0.1" in child.access_log.read_text()
