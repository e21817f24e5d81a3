"""Connections from the egress proxy to the outside: marked, and for HTTPS verified.

Every upstream socket carries ``KILN_NET_EGRESS_MARK`` (Kiln's table lets such
sockets leave only through the uplink). An intercepted HTTPS upstream is
verified against the host's trust store or ``KILN_EGRESS_CA_BUNDLE``, for the
name the guest asked for, before any credential is sent to it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from kiln.proxy.streams import READ_BYTES, PlainStream

CONNECT_TIMEOUT_SECONDS = 10.0
HANDSHAKE_TIMEOUT_SECONDS = 10.0


class UpstreamError(ConnectionError):
    """The service could not be reached, or could not prove it is who it says; ``str()`` says which."""


def upstream_context(bundle: Path | None) -> ssl.SSLContext:
    """TLS to services: the system's trust store, or only ``bundle`` when given."""
    context = ssl.create_default_context(cafile=str(bundle) if bundle is not None else None)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_marked(
    address: str, port: int, mark: int, *, tls: ssl.SSLContext | None = None, name: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``address:port`` from a marked socket (TLS to ``name`` when ``tls``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), CONNECT_TIMEOUT_SECONDS)
        return await asyncio.wait_for(
            asyncio.open_connection(
                sock=sock, limit=READ_BYTES, ssl=tls, server_hostname=name if tls is not None else None,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS if tls is not None else None,
            ),
            HANDSHAKE_TIMEOUT_SECONDS + 1,
        )  # fmt: skip
    except BaseException:
        sock.close()
        raise


async def connect_service(
    address: str, port: int, mark: int, *, name: str, tls: ssl.SSLContext | None
) -> PlainStream:
    """The service behind an intercepted connection; UpstreamError saying why not."""
    where = f"{name} ({address}:{port})"
    try:
        reader, writer = await open_marked(address, port, mark, tls=tls, name=name)
    except ssl.SSLCertVerificationError as error:
        raise UpstreamError(f"the certificate of {where} is not trusted: {error.verify_message}") from error
    except ssl.SSLError as error:
        raise UpstreamError(f"TLS with {where} failed: {error.reason or error}") from error
    except (OSError, TimeoutError) as error:
        raise UpstreamError(f"cannot connect to {where}: {error or type(error).__name__}") from error
    return PlainStream(reader, writer)
