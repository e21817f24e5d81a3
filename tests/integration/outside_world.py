"""A local "outside world" for networking tests: hosts in a network namespace,
named by a real DNS server (dnsmasq), serving HTTP, HTTPS, raw TCP and UDP.

Reusable: ``OutsideWorld.create(prefix)`` in a fixture, ``await world.close()``
at its end (also after a failure). Nothing of it is on the real network:

    host namespace                       world namespace <prefix>w
    <prefix>up  <gateway>/28  =========  eth0  dns, allowed, denied, raw, echo, untrusted /28
      (the uplink the tests set:                private/32 (an RFC 1918 host)
       KILN_UPLINK=<prefix>up)
      route private/32 via dns

The /28 is chosen inside TEST-NET-3 (203.0.113.0/24) among those no route on
the host uses yet, so test sessions running at once get different worlds;
tests drop TEST-NET-3 from ``net_blocked_cidrs`` so that the world counts as
the public internet. The private host lives in 172.31.0.0/16 (blocked).

``echo`` (``echo.test`` and names below it) answers every HTTP(S) request with
what it received as JSON (the way a debugging endpoint echoes a credential),
recording it in ``seen.requests``; its certificate is signed by the world's
own CA (``ca_pem``). ``untrusted.test`` serves HTTPS with a certificate no CA
of the world signed. ``mirror.test`` serves the files a test puts under
``mirror_root`` over HTTP (a package mirror: files without a suffix are JSON,
as an npm registry's metadata is), recording each path in ``seen.requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import http.server
import ipaddress
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kiln.config import Settings
from kiln.net import netns

WORLD_RANGE = ipaddress.IPv4Network("203.0.113.0/24")
PRIVATE_RANGE = ipaddress.IPv4Network("172.31.0.0/16")
DNSMASQ = "dnsmasq"
RAW_PORT = 7000
UDP_PORT = 9999
DOT_PORT = 853


def free_world_subnet() -> ipaddress.IPv4Network:
    """A /28 of TEST-NET-3 that no route on this host touches."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    used = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast") and len(line.split()) > 1:
            word = line.split()[1]
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(word, strict=False))
    candidates = [
        net for net in WORLD_RANGE.subnets(new_prefix=28) if not any(net.overlaps(u) for u in used if u.prefixlen > 0)
    ]
    if not candidates:
        raise RuntimeError("every /28 of 203.0.113.0/24 is in use on this host")
    return random.choice(candidates)


async def wire_world(
    namespace: str, host_link: str, subnet: ipaddress.IPv4Network, addresses: Iterable[str], extra: Iterable[str] = ()
) -> None:
    """A namespace joined to the host by a veth pair: the host's end ``host_link``
    holds the subnet's first address (the gateway); the namespace's ``eth0`` holds
    ``addresses`` (in the subnet) and ``extra`` ones (with their own prefix), and
    routes everything through the gateway."""
    gateway = f"{subnet.network_address + 1}/{subnet.prefixlen}"
    await netns.add(namespace)
    await netns.run_ip(["link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", namespace])
    await netns.run_ip([], batch=[f"address add {gateway} dev {host_link}", f"link set {host_link} up"])
    inside = [f"address add {address}/{subnet.prefixlen} dev eth0" for address in addresses]
    inside += [f"address add {address} dev eth0" for address in extra]
    inside += ["link set eth0 up", "link set lo up", f"route add default via {subnet.network_address + 1}"]
    await netns.run_ip(["-n", namespace], batch=inside)


async def unwire_world(namespace: str, host_link: str) -> None:
    """Undo ``wire_world`` (what of it there is: also after a half-made world)."""
    with contextlib.suppress(netns.NetnsError):
        await netns.run_ip(["link", "delete", host_link])
    await netns.delete(namespace)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited 5 s later."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def certificate_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """A certificate of the test worlds: valid from 5 minutes ago for a day."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


@dataclass(frozen=True)
class EchoedRequest:
    server: str
    method: str
    path: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class Seen:
    """What a world server received, for tests that assert nothing arrived."""

    connections: list[tuple[str, str]] = field(default_factory=list)  # (server, peer address)
    # When each connection was accepted (time.monotonic()), in the same order.
    accepted_at: list[float] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # Host headers / SNI the servers saw
    datagrams: list[tuple[str, bytes]] = field(default_factory=list)
    requests: list[EchoedRequest] = field(default_factory=list)  # what the echo servers received
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_connection(self, server: str, peer: str) -> None:
        with self.lock:
            self.connections.append((server, peer))
            self.accepted_at.append(time.monotonic())

    def clear(self) -> None:
        """Forget what came before (the world serves a whole test session)."""
        with self.lock:
            for record in (self.connections, self.accepted_at, self.hosts, self.datagrams, self.requests):
                record.clear()

    def to(self, server: str) -> list[str]:
        with self.lock:
            return [peer for name, peer in self.connections if name == server]

    def times_to(self, server: str) -> list[float]:
        """When the connections to ``server`` were accepted (time.monotonic())."""
        with self.lock:
            return [at for (name, _), at in zip(self.connections, self.accepted_at, strict=True) if name == server]


@dataclass
class OutsideWorld:
    prefix: str
    netns: str
    uplink: str
    subnet: ipaddress.IPv4Network
    private: str
    certificate_pem: bytes
    seen: Seen = field(default_factory=Seen)
    ca_pem: bytes = b""  # the world's own CA: it signed the echo servers' certificate
    _dnsmasq: subprocess.Popen | None = None
    _sockets: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workdir: Path | None = None

    # -- addresses and names

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def gateway(self) -> str:  # the host's end of the uplink
        return self.address(1)

    @property
    def dns(self) -> str:
        return self.address(2)

    @property
    def allowed(self) -> str:
        return self.address(3)

    @property
    def denied(self) -> str:
        return self.address(4)

    @property
    def raw(self) -> str:
        return self.address(5)

    @property
    def echo(self) -> str:
        return self.address(6)

    @property
    def untrusted(self) -> str:
        return self.address(7)

    @property
    def mirror(self) -> str:
        return self.address(8)

    @property
    def mirror_root(self) -> Path:
        """The directory ``mirror.test`` serves."""
        assert self._workdir is not None
        return self._workdir / "mirror"

    @property
    def names(self) -> dict[str, str]:
        return {
            "allowed.test": self.allowed,
            "api.allowed.test": self.allowed,
            "denied.test": self.denied,
            "raw.test": self.raw,
            "internal.test": self.private,
            "echo.test": self.echo,
            "api.echo.test": self.echo,
            "other.echo.test": self.echo,
            "untrusted.test": self.untrusted,
            "mirror.test": self.mirror,
        }

    def server_env(self) -> dict[str, str]:
        """What a ``kiln serve`` needs to use this world as its internet: the uplink,
        the DNS server, and TEST-NET-3 (where the world lives) counted as public."""
        blocked = [cidr for cidr in Settings().net_blocked_cidrs if cidr != str(WORLD_RANGE)]
        return {
            "KILN_UPLINK": self.uplink,
            "KILN_DNS_UPSTREAM": self.dns,
            "KILN_NET_BLOCKED_CIDRS": json.dumps(blocked),
        }

    @property
    def ca_bundle(self) -> Path:
        """A file holding the world's CA (for KILN_EGRESS_CA_BUNDLE)."""
        assert self._workdir is not None
        return self._workdir / "world-ca.pem"

    # -- life

    @classmethod
    async def create(cls, prefix: str) -> OutsideWorld:
        if shutil.which(DNSMASQ) is None:
            raise RuntimeError("dnsmasq is not installed (Debian: dnsmasq-base)")
        subnet = free_world_subnet()
        private = str(PRIVATE_RANGE.network_address + random.randint(256, 65000))
        world = cls(prefix, f"{prefix}w", f"{prefix}up", subnet, private, b"")
        try:
            await world._wire()
            world._workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-world-"))
            world._start_dns()
            await world._start_servers()
        except BaseException:
            await world.close()
            raise
        return world

    async def _wire(self) -> None:
        addresses = [self.address(i) for i in range(2, 9)]
        await wire_world(self.netns, self.uplink, self.subnet, addresses, extra=[f"{self.private}/32"])
        # The private host is "somewhere behind the uplink", as an internal network would be.
        await netns.run_ip(["route", "add", f"{self.private}/32", "via", self.dns, "dev", self.uplink])

    def _start_dns(self) -> None:
        assert self._workdir is not None
        records = [f"--host-record={name},{address}" for name, address in self.names.items()]
        self._dnsmasq = subprocess.Popen(
            [
                "ip", "netns", "exec", self.netns, DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null",
                "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={self.dns}", "--port=53",
                "--user=root", "--group=root", "--pid-file=", "--log-queries", "--log-facility=-",
                "--local-ttl=60", *records,
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self._workdir / "dnsmasq.log").open("wb"),
        )  # fmt: skip

    async def _start_servers(self) -> None:
        assert self._workdir is not None
        key, pem = self_signed(list(self.names))
        self.certificate_pem = pem
        (self._workdir / "cert.pem").write_bytes(pem)
        (self._workdir / "key.pem").write_bytes(key)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self._workdir / "cert.pem", self._workdir / "key.pem")
        echo_names = [name for name, address in self.names.items() if address == self.echo]
        self.ca_pem, echo_tls = self._tls_signed_by_a_ca(echo_names)
        self.ca_bundle.write_bytes(self.ca_pem)
        untrusted_tls = self._tls_self_signed(["untrusted.test"])
        listeners: list[tuple[str, str, int, Callable[[socket.socket, str], None]]] = []
        for label, address in (("allowed", self.allowed), ("denied", self.denied)):
            listeners.append((f"{label}-http", address, 80, self._http(f"{label}-http")))
            listeners.append((f"{label}-https", address, 443, self._https(f"{label}-https", tls)))
            listeners.append((f"{label}-dot", address, DOT_PORT, self._echo(f"{label}-dot")))
        listeners.append(("raw", self.raw, RAW_PORT, self._echo("raw")))
        listeners.append(("echo-http", self.echo, 80, self._echo_http("echo-http", None)))
        listeners.append(("echo-https", self.echo, 443, self._echo_http("echo-https", echo_tls)))
        listeners.append(("untrusted-https", self.untrusted, 443, self._echo_http("untrusted-https", untrusted_tls)))
        listeners.append(("private-http", self.private, 80, self._http("private-http")))
        self.mirror_root.mkdir()
        listeners.append(("mirror-http", self.mirror, 80, self._files("mirror-http")))
        listeners.append(("private-raw", self.private, RAW_PORT, self._echo("private-raw")))

        def make_sockets() -> list[tuple[str, socket.socket, Callable[[socket.socket, str], None]]]:
            made = []
            for name, address, port, handler in listeners:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                sock.listen(64)
                made.append((name, sock, handler))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.allowed, UDP_PORT))
            made.append(("udp", udp, self._udp))
            return made

        # Sockets made inside the world's namespace stay there; they are served from here.
        for name, sock, handler in await netns.run_in(self.netns, make_sockets):
            self._sockets.append(sock)
            target = self._serve_udp if name == "udp" else self._serve_tcp
            threading.Thread(target=target, args=(sock, handler), name=f"world:{name}", daemon=True).start()

    async def close(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._dnsmasq is not None:
            stop_process(self._dnsmasq)
        await unwire_world(self.netns, self.uplink)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def dnsmasq_log(self) -> str:
        assert self._workdir is not None
        return (self._workdir / "dnsmasq.log").read_text(errors="replace")

    # -- servers

    def _serve_tcp(self, sock: socket.socket, handler: Callable[[socket.socket, str], None]) -> None:
        while not self._stop.is_set():
            try:
                connection, peer = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._guarded, args=(handler, connection, peer[0]), daemon=True).start()

    @staticmethod
    def _guarded(handler: Callable[[socket.socket, str], None], connection: socket.socket, peer: str) -> None:
        with contextlib.suppress(OSError, ssl.SSLError), connection:
            connection.settimeout(30)
            handler(connection, peer)

    def _serve_udp(self, sock: socket.socket, handler: Callable[[socket.socket, str], None]) -> None:
        while not self._stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except OSError:
                return
            if peer is None or self._stop.is_set():
                return
            with self.seen.lock:
                self.seen.datagrams.append((peer[0], data))
            with contextlib.suppress(OSError):
                sock.sendto(data, peer)

    def _udp(self, sock: socket.socket, peer: str) -> None:  # pragma: no cover - only a marker
        raise NotImplementedError

    def _http(self, name: str) -> Callable[[socket.socket, str], None]:
        def serve(connection: socket.socket, peer: str) -> None:
            self.seen.add_connection(name, peer)
            respond_http(connection, name, self.seen)

        return serve

    def _files(self, name: str) -> Callable[[socket.socket, str], None]:
        handler = functools.partial(MirrorHandler, name, self.seen, directory=str(self.mirror_root))

        def serve(connection: socket.socket, peer: str) -> None:
            self.seen.add_connection(name, peer)
            handler(connection, (peer, 0), None)

        return serve

    def _https(self, name: str, context: ssl.SSLContext) -> Callable[[socket.socket, str], None]:
        def serve(connection: socket.socket, peer: str) -> None:
            self.seen.add_connection(name, peer)
            with context.wrap_socket(connection, server_side=True) as tls:
                first = tls.recv(4096)
                if first.startswith(b"ECHO"):
                    echo(tls, first)
                else:
                    respond_http(tls, name, self.seen, first)

        return serve

    def _tls_signed_by_a_ca(self, names: list[str]) -> tuple[bytes, ssl.SSLContext]:
        assert self._workdir is not None
        ca_pem, key, pem = ca_signed(names)
        (self._workdir / "echo.pem").write_bytes(pem + key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._workdir / "echo.pem")
        return ca_pem, context

    def _tls_self_signed(self, names: list[str]) -> ssl.SSLContext:
        assert self._workdir is not None
        key, pem = self_signed(names)
        (self._workdir / "untrusted.pem").write_bytes(pem + key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._workdir / "untrusted.pem")
        return context

    def _echo_http(self, name: str, tls: ssl.SSLContext | None) -> Callable[[socket.socket, str], None]:
        def serve(connection: socket.socket, peer: str) -> None:
            self.seen.add_connection(name, peer)
            if tls is None:
                echo_requests(connection, name, self.seen)
                return
            with tls.wrap_socket(connection, server_side=True) as wrapped:
                echo_requests(wrapped, name, self.seen)

        return serve

    def _echo(self, name: str) -> Callable[[socket.socket, str], None]:
        def serve(connection: socket.socket, peer: str) -> None:
            self.seen.add_connection(name, peer)
            echo(connection, b"")

        return serve


class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, one connection at a time; a file without a suffix is JSON."""

    def __init__(self, name: str, seen: Seen, *args: object, **kwargs: object) -> None:
        self._name, self._seen = name, seen
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def send_head(self) -> object:
        with self._seen.lock:
            self._seen.requests.append(EchoedRequest(self._name, self.command, self.path, []))
        return super().send_head()

    def guess_type(self, path: str | os.PathLike[str]) -> str:
        return "application/json" if not Path(path).suffix else super().guess_type(path)

    def log_message(self, format: str, *args: object) -> None:
        pass


def echo(connection: socket.socket, first: bytes) -> None:
    if first:
        connection.sendall(first)
    while data := connection.recv(4096):
        connection.sendall(data)


# GET /form of the plain HTTP hosts: a page for browser sessions. A red 100x100
# square at the top left on a blue page (for pixel checks), a form whose button
# shows a greeting a moment after it is clicked.
FORM_PAGE = b"""<!doctype html>
<html><head><title>Kiln form</title><style>
body { margin: 0; background: rgb(0, 128, 255); font-family: sans-serif; color: white; }
#mark { position: absolute; left: 0; top: 0; width: 100px; height: 100px; background: rgb(255, 0, 0); }
main { padding: 120px 20px; }
</style></head>
<body><div id="mark"></div><main>
<h1>Greeting form</h1>
<p>Type a name and press the button.</p>
<form onsubmit="return false"><label for="name">Name</label>
<input id="name" name="name"> <button id="go" type="button">Greet</button></form>
<p id="result" hidden></p>
</main><script>
document.getElementById("go").onclick = () => setTimeout(() => {
  const result = document.getElementById("result");
  result.textContent = "Hello, " + document.getElementById("name").value + "!";
  result.hidden = false;
}, 300);
</script></body></html>
"""


def respond_http(connection: socket.socket, name: str, seen: Seen, head: bytes = b"") -> None:
    while b"\r\n\r\n" not in head:
        data = connection.recv(4096)
        if not data:
            return
        head += data
    host = ""
    target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"host:"):
            host = line.split(b":", 1)[1].strip().decode()
    with seen.lock:
        seen.hosts.append(host)
    if target.startswith(b"/bytes/"):  # /bytes/N: N bytes, for throughput
        size = int(target[len(b"/bytes/") :])
        connection.sendall(f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n".encode())
        block = b"k" * 65536
        while size > 0:
            connection.sendall(block[: min(size, len(block))])
            size -= len(block)
        return
    body, kind = f"{name} host={host}\n".encode(), b"text/plain"
    if target.split(b"?")[0] == b"/form":
        body, kind = FORM_PAGE, b"text/html; charset=utf-8"
    connection.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def echo_requests(connection: socket.socket, name: str, seen: Seen) -> None:
    """Answer each request (keep-alive) with a JSON echo of its line, headers and body."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        line, *fields = head.decode("latin-1").split("\r\n")
        method, path, _ = line.split(" ", 2)
        headers = [(key.strip(), value.strip()) for key, value in (f.split(":", 1) for f in fields)]
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        while len(data) < length:
            chunk = connection.recv(65536)
            if not chunk:
                return
            data += chunk
        body, data = data[:length], data[length:]
        request = EchoedRequest(name, method, path, headers)
        with seen.lock:
            seen.requests.append(request)
        answer = json.dumps(
            {"server": name, "method": method, "path": path, "headers": headers, "body": body.decode("latin-1")}
        ).encode()
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(answer)}\r\n\r\n".encode()
            + answer
        )


def ca_signed(names: list[str]) -> tuple[bytes, bytes, bytes]:
    """A CA and a server certificate for ``names`` it signed: (CA PEM, key, PEM)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Kiln test world CA")])
    ca = (
        certificate_builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        certificate_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_name, key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), private_pem(key), leaf.public_bytes(pem)


def self_signed(names: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    certificate = (
        certificate_builder(subject, subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return private_pem(key), certificate.public_bytes(serialization.Encoding.PEM)


def can_build_worlds() -> str | None:
    """Why this host cannot run networking tests, or None."""
    if os.geteuid() != 0:
        return "networking tests need root"
    for tool in ("ip", DNSMASQ, "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    return None


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a bound, not a measurement)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
