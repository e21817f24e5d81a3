"""Certificate files under ``$KILN_DATA_DIR/domains/``: what the server writes
and the share router reads.

``certs/<domain>.pem`` holds the private key and the full chain in one file
(0600), replaced whole by a rename: the router never reads a key of one
certificate with the chain of another, and notices a renewal by the file's
change. ``keys/<domain>.pem`` is the key of an order not finished yet.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class CertificateInfo:
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    issuer: str
    names: tuple[str, ...]
    fingerprint: str  # SHA-256 of the leaf, hex


def new_private_key() -> bytes:
    """A P-256 key for one certificate, PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def describe(fullchain_pem: bytes) -> CertificateInfo:
    leaf = x509.load_pem_x509_certificates(fullchain_pem)[0]
    try:
        names = tuple(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        serial=format(leaf.serial_number, "x"),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        issuer=leaf.issuer.rfc4514_string(),
        names=names,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )


class CertificateFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, domain: str) -> Path:
        return self.directory / "certs" / f"{domain}.pem"

    def pending_key_path(self, domain: str) -> Path:
        return self.directory / "keys" / f"{domain}.pem"

    def write(self, domain: str, key_pem: bytes, fullchain_pem: bytes) -> None:
        """Key and chain in one 0600 file, replaced whole."""
        _write_secret(self.path(domain), key_pem.rstrip(b"\n") + b"\n" + fullchain_pem)

    def read(self, domain: str) -> bytes | None:
        try:
            return self.path(domain).read_bytes()
        except FileNotFoundError:
            return None

    def info(self, domain: str) -> CertificateInfo | None:
        data = self.read(domain)
        if data is None or b"CERTIFICATE" not in data:
            return None
        return describe(data)

    def has_key(self, domain: str) -> bool:
        data = self.read(domain)
        return data is not None and b"PRIVATE KEY" in data

    def pending_key(self, domain: str) -> bytes:
        """The key of the domain's next certificate: made once, kept until it is issued."""
        path = self.pending_key_path(domain)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            key = new_private_key()
            _write_secret(path, key)
            return key

    def forget_pending_key(self, domain: str) -> None:
        self.pending_key_path(domain).unlink(missing_ok=True)

    def remove(self, domain: str) -> None:
        self.path(domain).unlink(missing_ok=True)
        self.forget_pending_key(domain)


def _write_secret(path: Path, data: bytes) -> None:
    for directory in (path.parent.parent, path.parent):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
