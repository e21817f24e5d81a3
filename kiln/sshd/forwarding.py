"""Local port forwarding (``ssh -L PORT:localhost:GUEST_PORT``) into the VM,
through the agent (``tcp_connect``): the guest's end of each connection is a
socket the agent opens to its own loopback, so a server the guest binds to
127.0.0.1 is reachable, no guest network is needed, and the guest gets no new
way out (the agent connects to the guest itself only).

A port nothing listens on refuses the channel (``connect failed``, as OpenSSH
reports it); a destination other than the VM itself is refused before that.
Bytes flow both ways with the SSH channel's flow control on one side and the
stream's credit on the other; EOF is passed on as a half close.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
from asyncssh.stream import SSHTCPStreamSession

from kiln.guest import protocol
from kiln.sshd.relay import GuestError, GuestLink, b64, unb64

CHUNK_BYTES = 256 * 1024
# Names the client may use for the VM itself, besides its id and session id.
LOOPBACK_NAMES = {"localhost": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::1": "::1", "0.0.0.0": "127.0.0.1"}


def guest_host(dest_host: str, names: set[str]) -> str | None:
    """Where in the guest ``dest_host`` is (a loopback address), or None: not the VM."""
    if dest_host in LOOPBACK_NAMES:
        return LOOPBACK_NAMES[dest_host]
    return "127.0.0.1" if dest_host in names else None


async def open_forward(link: GuestLink, host: str, port: int) -> SSHTCPStreamSession[bytes]:
    """Connect in the guest, then hand asyncssh the session relaying the channel."""
    stream_id = "fwd-" + secrets.token_hex(8)
    frames = link.stream("tcp_connect", stream_id=stream_id, host=host, port=port).__aiter__()
    try:
        first = await frames.__anext__()
    except GuestError as error:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, error.message or error.code) from None
    if first.get("kind") != "connected":
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "unexpected answer from the guest agent")

    async def relay(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
        inbound = asyncio.create_task(_client_to_guest(reader, link, stream_id))
        try:
            await _guest_to_client(frames, writer, link, stream_id)
        finally:
            inbound.cancel()
            with contextlib.suppress(GuestError):
                await link.call("stream_close", stream_id=stream_id)
            writer.close()

    return SSHTCPStreamSession(relay)


async def _client_to_guest(reader: asyncssh.SSHReader[bytes], link: GuestLink, stream_id: str) -> None:
    try:
        while data := await reader.read(CHUNK_BYTES):
            await link.call("stream_write", stream_id=stream_id, data=b64(data))
        await link.call("stream_write", stream_id=stream_id, eof=True)
    except GuestError:
        pass  # the guest's server closed its end


async def _guest_to_client(
    frames: AsyncIterator[dict[str, Any]], writer: asyncssh.SSHWriter[bytes], link: GuestLink, stream_id: str
) -> None:
    with contextlib.suppress(GuestError, ConnectionError, BrokenPipeError):
        async for frame in frames:
            if frame.get("kind") == protocol.KIND_STDOUT:
                data = unb64(frame)
                writer.write(data)
                await writer.drain()
                await link.call("stream_ack", stream_id=stream_id, bytes=len(data))
        writer.write_eof()
