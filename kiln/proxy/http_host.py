"""The host name an HTTP/1.x request names (its Host header), parsed by h11.

Only the origin form (``GET /path``) is a request a transparent proxy should
see; an absolute-form target (``GET http://other/``) counts only if it names
the same host as the Host header. Anything h11 refuses is ``NotHttp``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import h11

from kiln.net.policy import normalise_name
from kiln.proxy.sni import NeedMore

MAX_HEAD_BYTES = 32 * 1024


class NotHttp(ValueError):
    """Not a well-formed HTTP/1.x request head with a Host header."""


def _host_part(authority: str) -> str | None:
    host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if port and not port.isdigit():
        return None
    return normalise_name(host)


def request_host(data: bytes) -> str:
    """The canonical Host of the first request in ``data``; NeedMore until its head is complete."""
    if not data:
        raise NeedMore  # h11 takes b"" for the end of the stream
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        connection.receive_data(data)
        event = connection.next_event()
    except h11.RemoteProtocolError as error:
        raise NotHttp(str(error)) from error
    if event is h11.NEED_DATA:
        if len(data) > MAX_HEAD_BYTES:
            raise NotHttp("request head too large")
        raise NeedMore
    if not isinstance(event, h11.Request):
        raise NotHttp(f"unexpected {type(event).__name__}")
    hosts = [value for name, value in event.headers if name == b"host"]
    if len(hosts) != 1:
        raise NotHttp(f"{len(hosts)} Host headers")
    host = _host_part(hosts[0].decode("ascii", "replace"))
    if host is None:
        raise NotHttp(f"Host {hosts[0]!r} is not a host name")
    target = event.target.decode("ascii", "replace")
    if not target.startswith("/") and target != "*":
        named = _host_part(urlsplit(target).netloc)
        if named != host:
            raise NotHttp(f"request target {target!r} names another host than Host")
    return host
