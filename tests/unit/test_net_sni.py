"""The ClientHello reader of the egress proxy, on real ClientHellos made by Python's ssl."""

from __future__ import annotations

import ssl

import pytest

from kiln.proxy.sni import NeedMore, NotClientHello, parse_client_hello


def client_hello(server_name: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message in TLS records of at most ``size`` bytes."""
    assert hello[0] == 22
    message = hello[5:]
    records = b""
    for at in range(0, len(message), size):
        piece = message[at : at + size]
        records += bytes([22, 3, 1]) + len(piece).to_bytes(2, "big") + piece
    return records


def test_server_name_of_a_real_client_hello() -> None:
    assert parse_client_hello(client_hello("Allowed.Example.com")).server_name == "allowed.example.com"


def test_no_server_name() -> None:
    assert parse_client_hello(client_hello(None)).server_name is None


def test_every_prefix_asks_for_more() -> None:
    hello = client_hello("allowed.example.com")
    for cut in range(len(hello)):
        with pytest.raises(NeedMore):
            parse_client_hello(hello[:cut])


def test_a_hello_split_over_many_records() -> None:
    hello = refragment(client_hello("split.example.com"), 7)
    assert parse_client_hello(hello).server_name == "split.example.com"
    with pytest.raises(NeedMore):
        parse_client_hello(hello[:-1])


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes([23, 3, 3, 0, 5]) + b"hello",  # application data, not a handshake
        bytes([22, 3, 1, 0, 4, 2, 0, 0, 0]),  # a ServerHello
        bytes([22, 3, 1, 0, 0]),  # an empty record
    ],
)
def test_not_a_client_hello(data: bytes) -> None:
    with pytest.raises(NotClientHello):
        parse_client_hello(data)


def test_two_server_name_extensions_are_refused() -> None:
    hello = client_hello("a.example.com")
    message = bytearray(hello[5:])
    # Find the server_name extension (type 0) and append a copy of it.
    name = b"a.example.com"
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    ext_body = len(entry).to_bytes(2, "big") + entry
    extension = b"\x00\x00" + len(ext_body).to_bytes(2, "big") + ext_body
    assert extension in message
    # extensions length is the 2 bytes before the first extension block: rebuild the tail
    body = bytes(message[4:])
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at : at + 2], "big")
    at += 1 + body[at]
    extensions = body[at + 2 :] + extension
    body = body[:at] + len(extensions).to_bytes(2, "big") + extensions
    forged = bytes([1]) + len(body).to_bytes(3, "big") + body
    record = bytes([22, 3, 1]) + len(forged).to_bytes(2, "big") + forged
    with pytest.raises(NotClientHello):
        parse_client_hello(record)


def test_a_name_that_is_no_host_name_is_refused() -> None:
    hello = client_hello("good.example.com")
    forged = hello.replace(b"good.example.com", b"good.exa/ple.com")
    with pytest.raises(NotClientHello):
        parse_client_hello(forged)
