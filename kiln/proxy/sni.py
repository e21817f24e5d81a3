"""The server name of a TLS ClientHello, from the whole message.

A ClientHello may span several TLS records and several TCP segments (large
ones do: post-quantum key shares, many extensions), and a name hidden in a
later record counts as much as one in the first, so the handshake message is
reassembled from its records before it is read. Anything that is not exactly
one well-formed ClientHello with at most one host name is ``NotClientHello``:
the proxy refuses it rather than guess (RFC 8446 4.1.2, RFC 6066 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.net.policy import normalise_name

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST_NAME = 0
MAX_RECORD_BYTES = (1 << 14) + 2048  # the TLSCiphertext bound; plaintext records are below it
MAX_HELLO_BYTES = 1 << 16


class NotClientHello(ValueError):
    """The bytes are not one well-formed TLS ClientHello."""


class NeedMore(Exception):
    """The ClientHello is not complete yet: read more."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, count: int) -> bytes:
        if self.at + count > len(self.data):
            raise NotClientHello("truncated field")
        piece = self.data[self.at : self.at + count]
        self.at += count
        return piece

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> _Reader:
        return _Reader(self.take(self.number(length_size)))

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def handshake_message(data: bytes) -> bytes:
    """The first handshake message, reassembled from the TLS records in ``data``."""
    message = bytearray()
    at = 0
    while True:
        if len(message) >= 4:
            length = int.from_bytes(message[1:4], "big")
            if message[0] != HANDSHAKE_CLIENT_HELLO:
                raise NotClientHello(f"handshake type {message[0]}, not ClientHello")
            if length > MAX_HELLO_BYTES:
                raise NotClientHello("ClientHello too large")
            if len(message) >= 4 + length:
                return bytes(message[4 : 4 + length])
        if len(data) < at + 5:
            raise NeedMore
        record_type, major, length = data[at], data[at + 1], int.from_bytes(data[at + 3 : at + 5], "big")
        if record_type != RECORD_HANDSHAKE or major != 3:
            raise NotClientHello("not a TLS handshake record")
        if length == 0 or length > MAX_RECORD_BYTES:
            raise NotClientHello("bad TLS record length")
        if len(data) < at + 5 + length:
            raise NeedMore
        message += data[at + 5 : at + 5 + length]
        at += 5 + length


def parse_client_hello(data: bytes) -> ClientHello:
    """Raises NeedMore until ``data`` holds the whole ClientHello."""
    body = _Reader(handshake_message(data))
    body.take(2)  # legacy_version
    body.take(32)  # random
    if body.vector(1).left > 32:
        raise NotClientHello("session id longer than 32 bytes")
    suites = body.vector(2)
    if suites.left < 2 or suites.left % 2:
        raise NotClientHello("bad cipher suites")
    if body.vector(1).left < 1:
        raise NotClientHello("no compression methods")
    if body.left == 0:
        return ClientHello(None)  # no extensions at all
    extensions = body.vector(2)
    if body.left:
        raise NotClientHello("bytes after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    while extensions.left:
        kind = extensions.number(2)
        data_of = extensions.vector(2)
        if kind in seen:
            raise NotClientHello(f"extension {kind} twice")
        seen.add(kind)
        if kind == EXTENSION_SERVER_NAME:
            server_name = _server_name(data_of)
    return ClientHello(server_name)


def _server_name(extension: _Reader) -> str:
    names = extension.vector(2)
    if extension.left:
        raise NotClientHello("bytes after the server name list")
    host_names: list[str] = []
    while names.left:
        name_type = names.number(1)
        value = names.vector(2)
        raw = value.take(value.left)
        if name_type != NAME_TYPE_HOST_NAME:
            continue  # no other types are defined; a client may not rely on them
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as error:
            raise NotClientHello("server name is not ASCII") from error
        canonical = normalise_name(text)
        if canonical is None or text.endswith("."):
            raise NotClientHello(f"server name {text!r} is not a host name")
        host_names.append(canonical)
    if len(host_names) != 1:
        raise NotClientHello(f"{len(host_names)} host names in server_name")
    return host_names[0]
