"""The local certificate authority that ``--intercept`` signs host certificates with.

Rules of this module:
- It imports the standard library and ``cryptography`` only (no Twisted), so the
  ``cacheproxy`` tool can use it and tests need no reactor.
- The clock is an argument (``now``); a naive ``datetime`` is taken as UTC, as
  ``cryptography`` does.
- Layout of a CA directory (mode 0700): ``ca.pem`` the certificate (public),
  ``ca.key`` its private key (mode 0600, created with ``O_EXCL`` so it is never
  readable by others, not even briefly), ``leaf/<host>.pem`` one host certificate
  followed by its key (mode 0600).
- A private key is never printed or logged; errors name files, never contents.
- Keys are EC P-256: fast to generate per host and accepted by every current client.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""The key types a CA may have: ours are EC, an RSA one brought along also works."""
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DIRECTORY = Path("var/ca")
CERT_FILE = "ca.pem"
KEY_FILE = "ca.key"
LEAF_DIR = "leaf"

CA_LIFETIME = timedelta(days=3653)
"""Ten years, leap days included."""
LEAF_LIFETIME = timedelta(days=397)
"""From not-before to not-after; browsers refuse server certificates over 398 days."""
BACKDATE = timedelta(days=1)
"""How far not-before lies in the past, for clients whose clocks run behind."""
RENEW_BEFORE = timedelta(days=1)
"""A cached host certificate is reused only while valid for at least this long."""

_COMMON_NAME_LIMIT = 64
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class CAError(Exception):
    """The CA is missing, unreadable, inconsistent, or would be overwritten."""


@dataclass(frozen=True)
class Authority:
    """A loaded CA.

    @ivar certificate: the self-signed CA certificate (``ca.pem``).
    @ivar key: its private key (``ca.key``); never print or log it.
    @ivar directory: where both live; host certificates are cached under ``leaf/``.
    """

    certificate: x509.Certificate
    key: PrivateKey
    directory: Path


# ---------------------------------------------------------------------------
# The CA itself
# ---------------------------------------------------------------------------


def init_ca(
    directory: Path,
    *,
    now: datetime,
    force: bool = False,
    hostname: str | None = None,
) -> Authority:
    """Create a CA key and self-signed certificate in ``directory``.

    Refuses (CAError) if a CA is there already, unless ``force``, which also drops
    the host certificates the old CA signed.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    _make_private_dir(directory)
    present = [p for p in (cert_path, key_path) if p.exists() or p.is_symlink()]
    if present and not force:
        raise CAError(f"a CA already exists in {directory} (use --force to replace it)")
    for path in present:
        path.unlink()
    shutil.rmtree(directory / LEAF_DIR, ignore_errors=True)

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _ca_certificate(key, _utc(now), hostname or socket.gethostname())
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return Authority(certificate=certificate, key=key, directory=directory)


def _ca_certificate(key: PrivateKey, now: datetime, hostname: str) -> x509.Certificate:
    """The self-signed CA certificate for ``key``, valid ten years from yesterday."""
    prefix = "cacheproxy local CA on "
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cacheproxy"),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                prefix + hostname[: _COMMON_NAME_LIMIT - len(prefix)],
            ),
        ]
    )
    not_before = now - BACKDATE
    # No NameConstraints: --intercept may name any host, so a constraint narrow
    # enough to matter would break interception; the trust note says so instead.
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256())


def load_ca(directory: Path) -> Authority:
    """The CA stored in ``directory``; CAError if missing, unreadable or mismatched."""
    directory = Path(directory)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not cert_path.exists() and not key_path.exists():
        raise CAError(f"no CA in {directory} (create one with: cacheproxy ca init)")
    try:
        certificate = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError:
        raise CAError(f"{cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError):
        raise CAError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{key_path} is neither an EC nor an RSA key")
    if _public_der(key.public_key()) != _public_der(certificate.public_key()):
        raise CAError(f"{key_path} is not the key of {cert_path}")
    if not _is_ca(certificate):
        raise CAError(f"{cert_path} is not a CA certificate")
    return Authority(certificate=certificate, key=key, directory=directory)


def fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint as colon-separated hex: ``AB:CD:...``."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# ---------------------------------------------------------------------------
# Host certificates
# ---------------------------------------------------------------------------


def leaf_for(
    authority: Authority,
    host: str,
    *,
    now: datetime,
    cache: dict[str, tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, bytes]:
    """A (certificate PEM, key PEM) pair for ``host``, signed by ``authority``.

    ``host`` is a DNS name or an IP literal (IPv6 with or without brackets);
    anything else is a ValueError. The pair comes from ``cache`` (memory) or
    ``leaf/`` (disk) while it stays valid for at least a day more, else it is made
    anew and stored in both. ``cache`` must serve one authority only. A ``leaf/``
    that cannot be created is a CAError, a file that cannot be written an OSError.
    """
    now = _utc(now)
    name, address = _normalize(host)
    if cache is not None and name in cache:
        cert_pem, key_pem = cache[name]
        if _lasts(x509.load_pem_x509_certificate(cert_pem), now):
            return cert_pem, key_pem
    path = authority.directory / LEAF_DIR / f"{_file_stem(name, address)}.pem"
    pair = _read_leaf(path, authority, name, address, now)
    if pair is None:
        pair = _make_leaf(authority, name, address, now)
        _make_private_dir(path.parent)
        _replace_private(path, pair[0] + pair[1])
    if cache is not None:
        cache[name] = pair
    return pair


def _make_leaf(
    authority: Authority,
    name: str,
    address: Address | None,
    now: datetime,
) -> tuple[bytes, bytes]:
    """A fresh key and certificate for one host, valid 397 days from yesterday."""
    key = ec.generate_private_key(ec.SECP256R1())
    alternative: x509.GeneralName = (
        x509.DNSName(name) if address is None else x509.IPAddress(address)
    )
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cacheproxy")]
    if len(name) <= _COMMON_NAME_LIMIT:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    ca = authority.certificate
    not_before = now - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_before + LEAF_LIFETIME, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(_authority_key_id(authority), critical=False)
    )
    certificate = builder.sign(authority.key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _read_leaf(
    path: Path,
    authority: Authority,
    name: str,
    address: Address | None,
    now: datetime,
) -> tuple[bytes, bytes] | None:
    """The pair cached at ``path`` if it is for ``name``, from this CA and lasting."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    marker = data.find(b"-----BEGIN PRIVATE KEY-----")
    if marker < 0:
        return None
    cert_pem, key_pem = data[:marker], data[marker:]
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        # After `ca init --force` a leaf of the old CA must not be served.
        certificate.verify_directly_issued_by(authority.certificate)
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return None
    wanted = names.get_values_for_type(
        x509.DNSName if address is None else x509.IPAddress
    )
    if (
        wanted != [name if address is None else address]
        or _public_der(key.public_key()) != _public_der(certificate.public_key())
        or not _lasts(certificate, now)
    ):
        return None
    return cert_pem, key_pem


def _lasts(certificate: x509.Certificate, now: datetime) -> bool:
    """Whether ``certificate`` is valid now and for at least a day more."""
    return (
        certificate.not_valid_before_utc <= now
        and certificate.not_valid_after_utc - now >= RENEW_BEFORE
    )


def _normalize(
    host: str,
) -> tuple[str, Address | None]:
    """``host`` in canonical form and, if it is an IP literal, its address."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return str(address), address
    try:
        name = host.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"not a host name: {host!r}") from None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"not a host name: {host!r}")
    return name, None


def _file_stem(name: str, address: Address | None) -> str:
    """A file name for a host: a DNS name or IPv4 as is, IPv6 as ``[2001-db8--1]``.

    Brackets never occur in a validated DNS name, so the names cannot collide.
    """
    if isinstance(address, ipaddress.IPv6Address):
        return "[" + name.replace(":", "-") + "]"
    return name


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (a naive one is taken as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """keyCertSign+cRLSign for the CA, digitalSignature for a server."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(authority: Authority) -> x509.AuthorityKeyIdentifier:
    """The AuthorityKeyIdentifier naming the CA: its SKI, else one from its key."""
    extensions = authority.certificate.extensions
    try:
        ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public = authority.key.public_key()
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _is_ca(certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` says it is a CA (BasicConstraints ca=True)."""
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _public_der(public: PublicKeyTypes) -> bytes:
    """``public`` as DER SubjectPublicKeyInfo, to compare keys."""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path) -> bytes:
    """The bytes of ``path``; CAError naming the file if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror or exc}") from None


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700) and its parents; an existing one is kept."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CAError(f"cannot create {directory}: {exc.strerror or exc}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (O_EXCL) and write ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        raise CAError(f"cannot create {path}: {exc.strerror or exc}") from None
    with open(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)


def _replace_private(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) through a temporary file, so readers never see half.

    Several workers may write the same host at once; the last one wins, and
    either pair is valid.
    """
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)  # mode 0600
    try:
        with open(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
