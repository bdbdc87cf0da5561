"""Tests for the local CA: creating, loading, and signing host certificates."""

from __future__ import annotations

import ast
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cacheproxy import ca
from cacheproxy.ca import Authority, CAError, fingerprint, init_ca, leaf_for, load_ca
from cacheproxy.cli import main

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """Where the CA of a test lives (not created yet)."""
    return tmp_path / "var" / "ca"


@pytest.fixture
def authority(directory: Path) -> Authority:
    """A CA created at NOW."""
    return init_ca(directory, now=NOW, hostname="testhost")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0, so only explicit modes keep files private."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise unless ``issuer``'s key made ``cert``'s ECDSA signature."""
    public = issuer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    public.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        ec.ECDSA(cert.signature_hash_algorithm),
    )


def spki(holder: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate's or private key's public key."""
    return bytes(
        holder.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


# ---------------------------------------------------------------------------
# init_ca, load_ca, fingerprint
# ---------------------------------------------------------------------------


def test_init_creates_private_key_and_directory(directory: Path, umask_zero: None):
    """init makes the directory 0700 and ca.key 0600 even under umask 0."""
    init_ca(directory, now=NOW, hostname="testhost")
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert mode(directory / "ca.pem") == 0o644
    assert b"PRIVATE KEY" in (directory / "ca.key").read_bytes()
    assert b"PRIVATE KEY" not in (directory / "ca.pem").read_bytes()


def test_init_makes_a_valid_self_signed_ca(authority: Authority, directory: Path):
    """The certificate is self-signed, a critical CA with keyCertSign, for ten years."""
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert cert == authority.certificate
    assert cert.issuer == cert.subject
    verify_signed_by(cert, cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert cert.not_valid_before_utc == NOW - timedelta(days=1)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3653)
    names = cert.subject.get_attributes_for_oid
    assert names(NameOID.COMMON_NAME)[0].value == "cacheproxy local CA on testhost"
    assert names(NameOID.ORGANIZATION_NAME)[0].value == "cacheproxy"
    assert spki(cert) == spki(authority.key)


def test_init_keeps_a_long_hostname_within_the_name_limit(directory: Path):
    """A hostname too long for a common name is cut to fit 64 characters."""
    cert = init_ca(directory, now=NOW, hostname="h" * 100).certificate
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert len(common) == 64 and common.startswith("cacheproxy local CA on hhh")


def test_init_refuses_an_existing_ca(authority: Authority, directory: Path):
    """A second init without force fails and leaves the first CA in place."""
    with pytest.raises(CAError, match="already exists"):
        init_ca(directory, now=NOW)
    assert load_ca(directory).certificate == authority.certificate


def test_init_with_force_replaces_the_ca_and_its_leaves(
    authority: Authority, directory: Path
):
    """init with force makes a new key and certificate and drops the old leaves."""
    leaf_for(authority, "example.com", now=NOW)
    replaced = init_ca(directory, now=NOW, force=True)
    assert fingerprint(replaced.certificate) != fingerprint(authority.certificate)
    assert spki(replaced.key) != spki(authority.key)
    assert load_ca(directory).certificate == replaced.certificate
    assert not (directory / "leaf").exists()
    assert mode(directory / "ca.key") == 0o600


def test_load_ca_round_trips(authority: Authority, directory: Path):
    """load_ca returns the certificate and key that init_ca created."""
    loaded = load_ca(directory)
    assert loaded.certificate == authority.certificate
    assert spki(loaded.key) == spki(authority.key)
    assert loaded.directory == directory


def test_load_ca_without_a_ca_says_how_to_make_one(directory: Path):
    """A missing CA is a CAError that names the directory and ca init."""
    with pytest.raises(CAError, match="no CA in .*cacheproxy ca init"):
        load_ca(directory)


def test_load_ca_rejects_a_key_of_another_ca(tmp_path: Path, directory: Path):
    """A ca.key that does not match ca.pem is a CAError."""
    init_ca(directory, now=NOW)
    other = init_ca(tmp_path / "other", now=NOW)
    (directory / "ca.key").write_bytes((other.directory / "ca.key").read_bytes())
    with pytest.raises(CAError, match="is not the key of"):
        load_ca(directory)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ca.pem", b"garbage", "is not a PEM certificate"),
        ("ca.key", b"garbage", "is not an unencrypted PEM private key"),
        ("ca.key", None, "cannot read"),
    ],
)
def test_load_ca_reports_a_broken_file(
    authority: Authority,
    directory: Path,
    name: str,
    content: bytes | None,
    message: str,
):
    """A garbled or missing half of the CA is a CAError naming the file."""
    if content is None:
        (directory / name).unlink()
    else:
        (directory / name).write_bytes(content)
    with pytest.raises(CAError, match=message):
        load_ca(directory)


def test_fingerprint_is_colon_separated_sha256(authority: Authority):
    """fingerprint is the upper-case hex SHA-256 of the DER, bytes joined by colons."""
    value = fingerprint(authority.certificate)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", value)
    der = authority.certificate.public_bytes(serialization.Encoding.DER)
    assert value.replace(":", "").lower() == hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------------------
# leaf_for
# ---------------------------------------------------------------------------


def check_leaf(authority: Authority, pair: tuple[bytes, bytes]) -> x509.Certificate:
    """Assert what every host certificate must be; return it."""
    cert_pem, key_pem = pair
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    ca_cert = authority.certificate
    assert cert.issuer == ca_cert.subject
    verify_signed_by(cert, ca_cert)
    assert spki(cert) == spki(key)
    assert cert.not_valid_before_utc <= NOW <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=397)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert not constraints.value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    return cert


def alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    """The certificate's SubjectAlternativeName."""
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_leaf_for_a_dns_name(authority: Authority):
    """A DNS host gets a CA-signed server certificate with its name as DNSName SAN."""
    cert = check_leaf(authority, leaf_for(authority, "Example.COM.", now=NOW))
    assert alt_names(cert).get_values_for_type(x509.DNSName) == ["example.com"]
    assert alt_names(cert).get_values_for_type(x509.IPAddress) == []


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[2001:db8::1]", "2001:db8::1")],
)
def test_leaf_for_an_ip_literal(authority: Authority, host: str, address: str):
    """An IP host (IPv6 with or without brackets) gets an IPAddress SAN."""
    cert = check_leaf(authority, leaf_for(authority, host, now=NOW))
    names = alt_names(cert)
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(address)]
    assert names.get_values_for_type(x509.DNSName) == []


def test_leaf_for_an_international_name_uses_its_a_label(authority: Authority):
    """A Unicode host name is certified in its IDNA (xn--) form."""
    cert = check_leaf(authority, leaf_for(authority, "bücher.example", now=NOW))
    assert alt_names(cert).get_values_for_type(x509.DNSName) == [
        "xn--bcher-kva.example"
    ]


@pytest.mark.parametrize(
    "host", ["", ".", "a..b", "bad host", "*.example.com", "../etc/passwd", "a/b"]
)
def test_leaf_for_rejects_what_is_not_a_host(authority: Authority, host: str):
    """Anything but a DNS name or IP literal is a ValueError, and nothing is written."""
    with pytest.raises(ValueError, match="not a host name"):
        leaf_for(authority, host, now=NOW)
    assert not (authority.directory / "leaf").exists()


def test_leaf_is_cached_in_memory_and_on_disk(authority: Authority, umask_zero: None):
    """A repeat call gives the same bytes; the file is 0600; a new dict reuses it."""
    cache: dict[str, tuple[bytes, bytes]] = {}
    first = leaf_for(authority, "example.com", now=NOW, cache=cache)
    assert cache == {"example.com": first}
    assert leaf_for(authority, "EXAMPLE.com", now=NOW, cache=cache) == first
    path = authority.directory / "leaf" / "example.com.pem"
    assert path.read_bytes() == first[0] + first[1]
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    later = NOW + timedelta(days=100)
    assert leaf_for(load_ca(authority.directory), "example.com", now=later) == first
    ipv6 = leaf_for(authority, "::1", now=NOW)
    assert (authority.directory / "leaf" / "[--1].pem").read_bytes() == b"".join(ipv6)


def test_leaf_is_renewed_a_day_before_it_expires(authority: Authority):
    """A cached leaf with less than a day left is replaced, in memory and on disk."""
    cache: dict[str, tuple[bytes, bytes]] = {}
    first = leaf_for(authority, "example.com", now=NOW, cache=cache)
    expiry = x509.load_pem_x509_certificate(first[0]).not_valid_after_utc
    late = expiry - timedelta(hours=12)
    renewed = leaf_for(authority, "example.com", now=late, cache=cache)
    assert renewed != first
    assert x509.load_pem_x509_certificate(renewed[0]).not_valid_after_utc > expiry
    assert leaf_for(authority, "example.com", now=late) == renewed


def test_leaf_of_a_replaced_ca_is_not_reused(tmp_path: Path, authority: Authority):
    """A leaf file signed by another CA is regenerated, not served."""
    other = init_ca(tmp_path / "other", now=NOW)
    stale = leaf_for(other, "example.com", now=NOW)
    (authority.directory / "leaf").mkdir(mode=0o700)
    path = authority.directory / "leaf" / "example.com.pem"
    path.write_bytes(stale[0] + stale[1])
    fresh = leaf_for(authority, "example.com", now=NOW)
    assert fresh != stale
    check_leaf(authority, fresh)
    assert path.read_bytes() == fresh[0] + fresh[1]


def test_leaf_chains_to_the_ca_under_webpki_rules(authority: Authority):
    """cryptography's own path validation accepts the leaf for its host via the CA."""
    verification = pytest.importorskip(
        "cryptography.x509.verification",
        reason="cryptography without x509.verification (added in 43)",
    )
    if not hasattr(verification, "PolicyBuilder"):
        pytest.skip("cryptography without x509.verification.PolicyBuilder")
    store = verification.Store([authority.certificate])
    builder = verification.PolicyBuilder().store(store).time(NOW)
    for host, subject in [
        ("example.com", verification.DNSName("example.com")),
        ("192.0.2.7", verification.IPAddress(ipaddress.ip_address("192.0.2.7"))),
    ]:
        cert = x509.load_pem_x509_certificate(leaf_for(authority, host, now=NOW)[0])
        chain = builder.build_server_verifier(subject).verify(cert, [])
        assert chain == [cert, authority.certificate]
    wrong = builder.build_server_verifier(verification.DNSName("other.example"))
    with pytest.raises(verification.VerificationError):
        wrong.verify(cert, [])


def test_ca_module_knows_no_twisted():
    """ca.py does not import Twisted."""
    tree = ast.parse(Path(ca.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("twisted") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("twisted")


# ---------------------------------------------------------------------------
# cacheproxy ca init / show
# ---------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``cacheproxy *argv``; return the status, stdout and stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_ca_init_prints_path_fingerprint_and_how_to_trust(
    capsys: pytest.CaptureFixture[str], directory: Path
):
    """ca init prints the PEM path, the fingerprint and per-client trust commands."""
    status, out, err = run(capsys, "ca", "init", "--ca-dir", str(directory))
    assert status == 0, err
    authority = load_ca(directory)
    assert str(directory / "ca.pem") in out
    assert fingerprint(authority.certificate) in out
    for needle in (
        "/usr/local/share/ca-certificates/",
        "update-ca-certificates",
        "PIP_CERT",
        "--cert",
        "cafile",
        "--cacert",
        "REQUESTS_CA_BUNDLE",
        "browsers",
        "impersonate",
    ):
        assert needle in out, needle
    assert "PRIVATE KEY" not in out + err
    assert mode(directory / "ca.key") == 0o600


def test_cli_ca_init_twice_needs_force(
    capsys: pytest.CaptureFixture[str], directory: Path
):
    """A second ca init fails with one error line; with --force it replaces the CA."""
    assert run(capsys, "ca", "init", "--ca-dir", str(directory))[0] == 0
    first = fingerprint(load_ca(directory).certificate)
    status, out, err = run(capsys, "ca", "init", "--ca-dir", str(directory))
    assert status == 1 and out == ""
    assert err.startswith("cacheproxy: error: a CA already exists")
    assert err.count("\n") == 1 and "--force" in err
    assert fingerprint(load_ca(directory).certificate) == first
    status, out, _ = run(capsys, "ca", "init", "--force", "--ca-dir", str(directory))
    assert status == 0
    assert fingerprint(load_ca(directory).certificate) != first


def test_cli_ca_show_prints_fingerprint_and_expiry(
    capsys: pytest.CaptureFixture[str], directory: Path
):
    """ca show prints the SHA-256 fingerprint and the expiry date, never the key."""
    run(capsys, "ca", "init", "--ca-dir", str(directory))
    status, out, err = run(capsys, "ca", "show", "--ca-dir", str(directory))
    assert status == 0, err
    cert = load_ca(directory).certificate
    assert f"SHA-256 fingerprint: {fingerprint(cert)}" in out
    assert cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") in out
    assert "PRIVATE KEY" not in out + err


def test_cli_ca_show_without_a_ca_fails(
    capsys: pytest.CaptureFixture[str], directory: Path
):
    """ca show on a directory without a CA is one error line and exit status 1."""
    status, out, err = run(capsys, "ca", "show", "--ca-dir", str(directory))
    assert status == 1 and out == ""
    assert err == f"cacheproxy: error: no CA in {directory}" + (
        " (create one with: cacheproxy ca init)\n"
    )


def test_cli_ca_show_with_a_mismatched_key_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, directory: Path
):
    """ca show reports a ca.key that belongs to another CA, without printing it."""
    init_ca(directory, now=NOW)
    other = init_ca(tmp_path / "other", now=NOW)
    (directory / "ca.key").write_bytes((other.directory / "ca.key").read_bytes())
    status, out, err = run(capsys, "ca", "show", "--ca-dir", str(directory))
    assert status == 1 and out == ""
    assert err.startswith("cacheproxy: error: ") and "is not the key of" in err
    assert "PRIVATE KEY" not in err


def test_cli_ca_needs_an_action(capsys: pytest.CaptureFixture[str]):
    """``cacheproxy ca`` alone is a usage error with exit status 2."""
    assert run(capsys, "ca")[0] == 2


def test_cli_ca_init_defaults_to_var_ca(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Without --ca-dir the CA goes to var/ca under the working directory."""
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "ca", "init")[0] == 0
    assert mode(tmp_path / "var" / "ca") == 0o700
    load_ca(tmp_path / "var" / "ca")
