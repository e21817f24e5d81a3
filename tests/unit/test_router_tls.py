"""The router's HTTPS: SNI picks the certificate file of the name, a replaced
file is served from the next handshake on, a removed or unknown one ends the
handshake (real TLS over a socket pair)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from unit.certs import Certificate, make_ca, make_server_certificate

from kiln.domains.certs import CertificateFiles
from kiln.router.tls import SniCertificates


def handshake(certificates: SniCertificates, name: str, ca: Certificate) -> str | None:
    """The serial the router side presents for ``name``, or None if it ended the handshake."""
    server_end, client_end = socket.socketpair()
    server = certificates.server_context()

    def serve() -> None:
        try:
            with server.wrap_socket(server_end, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            server_end.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.create_default_context(cadata=ca.pem)
    try:
        with client.wrap_socket(client_end, server_hostname=name) as tls:
            served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            tls.sendall(b"x")
            return format(served.serial_number, "x")
    except (ssl.SSLError, OSError):
        return None
    finally:
        client_end.close()
        thread.join(10)


def issue(files: CertificateFiles, ca: Certificate, domain: str) -> str:
    made = make_server_certificate(ca, domain)
    files.write(domain, made.key_pem.encode(), made.pem.encode() + ca.pem.encode())
    return format(x509.load_pem_x509_certificate(made.pem.encode()).serial_number, "x")


def test_sni_picks_the_file_of_the_name_and_follows_its_changes(tmp_path: Path) -> None:
    ca = make_ca()
    files = CertificateFiles(tmp_path / "domains")
    certificates = SniCertificates(files)
    first = issue(files, ca, "app.example.com")
    other = issue(files, ca, "other.example.com")
    assert handshake(certificates, "app.example.com", ca) == first
    assert handshake(certificates, "OTHER.example.com", ca) == other
    assert handshake(certificates, "unknown.example.com", ca) is None
    assert handshake(certificates, "not_a_host.example.com", ca) is None  # no file name from a bad name

    renewed = issue(files, ca, "app.example.com")  # replaced whole, no restart
    assert renewed != first and handshake(certificates, "app.example.com", ca) == renewed
    files.remove("app.example.com")
    assert handshake(certificates, "app.example.com", ca) is None
    assert handshake(certificates, "other.example.com", ca) == other


def test_a_file_that_does_not_load_is_not_served(tmp_path: Path) -> None:
    ca = make_ca()
    files = CertificateFiles(tmp_path / "domains")
    files.write("app.example.com", b"-----BEGIN PRIVATE KEY-----\nnonsense\n", b"")
    assert handshake(SniCertificates(files), "app.example.com", ca) is None
