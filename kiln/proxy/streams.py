"""Byte streams the interceptor relays between: plain TCP, and TLS it terminates.

``TlsServerStream`` runs the server side of TLS over an asyncio stream pair
with ``ssl.SSLObject`` and memory BIOs, because the ClientHello was already
read off the socket (to learn the server name) before the proxy decided to
terminate TLS: asyncio's ``start_tls`` would not see those bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol, TypeVar

READ_BYTES = 64 * 1024
T = TypeVar("T")


class ByteStream(Protocol):
    async def receive(self) -> bytes:
        """Up to READ_BYTES; b"" at the end of the stream."""
        ...

    async def send(self, data: bytes) -> None: ...

    async def aclose(self) -> None:
        """A clean close (TLS: close_notify first)."""
        ...

    def abort(self) -> None:
        """Close at once with a TCP reset."""
        ...


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort with a TCP reset (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class PlainStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def receive(self) -> bytes:
        return await self.reader.read(READ_BYTES)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    def abort(self) -> None:
        reset(self.writer)


class TlsServerStream:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext,
        already_read: bytes,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._incoming.write(already_read)
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def handshake(self) -> None:
        await self._run(self._tls.do_handshake)

    async def receive(self) -> bytes:
        try:
            return await self._run(lambda: self._tls.read(READ_BYTES))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # a close_notify, or the peer went without one

    async def send(self, data: bytes) -> None:
        await self._run(lambda: self._tls.write(data))

    async def aclose(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError, ConnectionError):
            self._tls.unwrap()
        with contextlib.suppress(OSError, ConnectionError):
            await self._flush()
        self.writer.close()

    def abort(self) -> None:
        reset(self.writer)

    async def _run(self, operation: Callable[[], T]) -> T:
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.reader.read(READ_BYTES)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                continue
            await self._flush()
            return result

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()
