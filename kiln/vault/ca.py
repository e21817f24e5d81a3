"""The installation's egress CA: what the egress proxy signs intercepted hosts' certificates with.

Made by the egress daemon on its first start, in ``$KILN_DATA_DIR/net/vault-ca/``
(0700): ``ca.key`` (EC P-256, 0600; read by the daemon only) and ``ca.pem``
(the certificate, which guests of VMs with vaults are told to trust). A leaf
certificate per intercepted name is issued in memory when first needed (valid
``LEAF_DAYS``, re-issued a day before it ends) and never written to disk: its
key reaches OpenSSL through an anonymous memory file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import tempfile
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DIR = "vault-ca"
KEY_FILE = "ca.key"
CERT_FILE = "ca.pem"
CA_YEARS = 10
LEAF_DAYS = 7
LEAF_RENEW_BEFORE = datetime.timedelta(days=1)
MAX_CACHED_LEAVES = 1024
GUEST_TRUST_NAME = "kiln-egress"  # the name trust_ca files it under in guests


class CaError(RuntimeError):
    pass


def ca_directory(state_dir: Path) -> Path:
    return state_dir / CA_DIR


def read_certificate(state_dir: Path) -> str:
    """The CA certificate (PEM) for guests; CaError until the egress daemon has made it."""
    try:
        return (ca_directory(state_dir) / CERT_FILE).read_text()
    except FileNotFoundError:
        raise CaError("the egress CA does not exist yet (the egress daemon makes it when it starts)") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class EgressCa:
    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self._key = key
        self._leaves: OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = OrderedDict()

    def __repr__(self) -> str:
        return f"EgressCa({self.certificate.subject.rfc4514_string()})"

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path) -> EgressCa:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError:
            key = _create_key(key_path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"{key_path} is not an EC private key")
        certificate = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if certificate is None or certificate.public_key() != key.public_key():
            # First start, or a crash between the key and its certificate.
            certificate = _ca_certificate(key)
            _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(certificate, key)

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``name`` signed by this CA."""
        cached = self._leaves.get(name)
        if cached is not None and cached[1] - _now() > LEAF_RENEW_BEFORE:
            self._leaves.move_to_end(name)
            return cached[0]
        context, not_after = self._issue(name)
        self._leaves[name] = (context, not_after)
        self._leaves.move_to_end(name)
        while len(self._leaves) > MAX_CACHED_LEAVES:
            self._leaves.popitem(last=False)
        return context

    def _issue(self, name: str) -> tuple[ssl.SSLContext, datetime.datetime]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = now + datetime.timedelta(days=LEAF_DAYS)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signing=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        # OpenSSL reads certificates from files only: an anonymous memory file
        # keeps the leaf's key off every disk.
        fd = os.memfd_create("kiln-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context, not_after


def _key_usage(*, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=signing, crl_sign=signing, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = _now()
    serial = x509.random_serial_number()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kiln"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Kiln egress CA {serial:x}"[:64]),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signing=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomically(path, pem, 0o600)
    return key


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
