"""A local world for custom-domain tests: an authoritative DNS server (Debian's
``knot``, dynamic updates signed with TSIG) and an ACME test CA (Debian's
``pebble``, validating DNS-01 challenges through that DNS server), in a network
namespace of their own. Nothing of it is on the real network:

    host namespace                      world namespace <prefix>d
    <prefix>dh  <gateway>/28  ========  eth0  dns (knot :53), acme (pebble :14000, management :15000)

The /28 is one of TEST-NET-3 that no route on the host uses, wired as the
outside world's is (``outside_world.wire_world``). The zone is ``example.test`` (NS ``ns1.example.test`` = the DNS
address); ``update.kiln`` is the TSIG key allowed to update it. Pebble's own
HTTPS certificate is signed by a CA made here (``ca_pem``: what Kiln must
trust to reach it); the certificates it issues chain to a root it makes at
start (``issuing_roots()``).

``DomainWorld.create(prefix)`` in a fixture, ``await world.close()`` at its
end (also after a failure): the processes are stopped, the namespace and the
work dir removed.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import dns.tsigkeyring
import dns.update
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from outside_world import (
    certificate_builder,
    free_world_subnet,
    private_pem,
    stop_process,
    unwire_world,
    wire_world,
)

from kiln.net import netns

ZONE = "example.test"
KEY_NAME = "update.kiln"
ACME_PORT = 14000
MANAGEMENT_PORT = 15000
# Shorter than Kiln's default renewal threshold (30 days): every certificate
# pebble issues here is due for renewal at once.
CERTIFICATE_VALIDITY_SECONDS = 20 * 24 * 3600
START_SECONDS = 20.0


def missing_tools() -> str | None:
    for tool in ("knotd", "pebble", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: knot, pebble, iproute2)"
    if os.geteuid() != 0:
        return "custom-domain tests need root (network namespaces)"
    return None


@dataclass
class DomainWorld:
    prefix: str
    subnet: ipaddress.IPv4Network
    workdir: Path
    secret: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode())
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{self.prefix}d"

    @property
    def host_link(self) -> str:
        return f"{self.prefix}dh"

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def gateway(self) -> str:
        return self.address(1)

    @property
    def dns(self) -> str:
        return self.address(2)

    @property
    def acme(self) -> str:
        return self.address(3)

    @property
    def directory(self) -> str:
        return f"https://{self.acme}:{ACME_PORT}/dir"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pebble-ca.pem"

    def credentials(self, secret: str | None = None) -> dict[str, str]:
        """``dns_credentials`` of the rfc2136 provider for this world's zone."""
        return {
            "server": f"{self.dns}:53",
            "key_name": KEY_NAME,
            "secret": secret or self.secret,
            "algorithm": "hmac-sha256",
        }

    # -- life

    @classmethod
    async def create(cls, prefix: str) -> DomainWorld:
        world = cls(prefix, free_world_subnet(), Path(tempfile.mkdtemp(prefix=f"{prefix}-domains-")))
        try:
            await wire_world(world.netns, world.host_link, world.subnet, [world.dns, world.acme])
            world._start_knot()
            world._start_pebble()
            world._wait_until_up()
        except BaseException:
            await world.close()
            raise
        return world

    def _start_knot(self) -> None:
        zones = self.workdir / "zones"
        zones.mkdir()
        (self.workdir / "db").mkdir()
        (zones / f"{ZONE}.zone").write_text(
            f"$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns1 hostmaster 1 60 60 3600 60\n@ NS ns1\nns1 A {self.dns}\n"
        )
        config = self.workdir / "knot.conf"
        config.write_text(
            f"""server:
    listen: {self.dns}@53
    rundir: {self.workdir}
    user: root:root
    pidfile: {self.workdir}/knot.pid
database:
    storage: {self.workdir}/db
control:
    listen: {self.workdir}/knot.sock
log:
  - target: stderr
    any: info
key:
  - id: {KEY_NAME}
    algorithm: hmac-sha256
    secret: {self.secret}
acl:
  - id: updates
    key: {KEY_NAME}
    action: update
template:
  - id: default
    storage: {zones}
    file: "%s.zone"
    zonefile-sync: -1
    journal-content: none
zone:
  - domain: {ZONE}
    acl: updates
"""
        )
        self._spawn("knot", ["knotd", "-c", str(config)], {})

    def _start_pebble(self) -> None:
        ca_key, ca = _certificate_authority()
        key, certificate = _leaf(ca_key, ca, self.acme)
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (self.workdir / "pebble-cert.pem").write_bytes(certificate)
        (self.workdir / "pebble-key.pem").write_bytes(key)
        config = self.workdir / "pebble.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"{self.acme}:{ACME_PORT}",
                        "managementListenAddress": f"{self.acme}:{MANAGEMENT_PORT}",
                        "certificate": str(self.workdir / "pebble-cert.pem"),
                        "privateKey": str(self.workdir / "pebble-key.pem"),
                        "httpPort": 5002,
                        "tlsPort": 5001,
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                        "certificateValidityPeriod": CERTIFICATE_VALIDITY_SECONDS,
                    }
                }
            )
        )
        # No artificial waits and no random refusals: the tests see what Kiln does.
        environment = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self._spawn("pebble", ["pebble", "-config", str(config), "-dnsserver", f"{self.dns}:53"], environment)

    def _spawn(self, name: str, command: list[str], environment: dict[str, str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "env", *(f"{k}={v}" for k, v in environment.items()), *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._processes.append(process)

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a domain-world server exited at start:\n{self.logs()}")
            try:
                self.query(f"ns1.{ZONE}", "A")
                with urllib.request.urlopen(self.directory, context=self._tls(), timeout=2) as answer:
                    json.load(answer)
                return
            except (OSError, dns.exception.DNSException, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"knot or pebble did not answer in time:\n{self.logs()}") from None
                time.sleep(0.1)

    async def close(self) -> None:
        for process in self._processes:
            stop_process(process)
        with contextlib.suppress(netns.NetnsError):
            await unwire_world(self.netns, self.host_link)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def running(self) -> list[int]:
        """Pids of this world's servers still running (none after ``close``)."""
        return [process.pid for process in self._processes if process.poll() is None]

    def logs(self) -> str:
        parts = []
        for name in ("knot", "pebble"):
            path = self.workdir / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    # -- what the tests ask of it

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def issuing_roots(self) -> str:
        """The root pebble signs certificates under (made at its start)."""
        url = f"https://{self.acme}:{MANAGEMENT_PORT}/roots/0"
        with urllib.request.urlopen(url, context=self._tls(), timeout=10) as answer:
            return str(answer.read().decode())

    def query(self, name: str, rdtype: str) -> list[str]:
        """What knot serves for ``name`` (TXT strings joined, other types as text)."""
        response = dns.query.udp(dns.message.make_query(name, rdtype), self.dns, timeout=3)
        values = []
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.from_text(rdtype):
                continue
            for rdata in rrset:
                text = b"".join(rdata.strings).decode() if rrset.rdtype == dns.rdatatype.TXT else rdata.to_text()
                values.append(text)
        return values

    def publish(self, records: list[dict[str, str]]) -> None:
        """What a user does at their DNS host: add ``records`` (``type``, ``name``, ``value``)."""
        keyring = dns.tsigkeyring.from_text({KEY_NAME: self.secret})
        update = dns.update.UpdateMessage(f"{ZONE}.", keyring=keyring, keyname=KEY_NAME, keyalgorithm="hmac-sha256")
        for record in records:
            value = f'"{record["value"]}"' if record["type"] == "TXT" else record["value"]
            update.replace(f"{record['name']}.", 60, record["type"], value)
        response = dns.query.tcp(update, self.dns, timeout=5)
        assert response.rcode() == 0, response


def _certificate_authority() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln test pebble CA")])
    certificate = (
        certificate_builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, address: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    certificate = (
        certificate_builder(subject, ca.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return private_pem(key), certificate.public_bytes(serialization.Encoding.PEM)
