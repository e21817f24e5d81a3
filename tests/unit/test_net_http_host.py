"""The Host reader of the egress proxy (h11)."""

from __future__ import annotations

import pytest

from kiln.proxy.http_host import NotHttp, request_host
from kiln.proxy.sni import NeedMore


def test_host_header() -> None:
    assert (
        request_host(b"GET /x HTTP/1.1\r\nHost: Allowed.Example.com:80\r\nAccept: */*\r\n\r\n") == "allowed.example.com"
    )


def test_incomplete_head_asks_for_more() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
    for cut in range(len(head) - 1):
        with pytest.raises(NeedMore):
            request_host(head[:cut])


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n",
        b"GET http://evil.example.com/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80:80\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",  # TLS on port 80
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ],
)
def test_refused_heads(head: bytes) -> None:
    with pytest.raises(NotHttp):
        request_host(head)


def test_absolute_form_naming_the_same_host() -> None:
    assert request_host(b"GET http://a.example.com/x HTTP/1.1\r\nHost: a.example.com\r\n\r\n") == "a.example.com"
