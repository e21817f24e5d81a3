"""A host loopback port that reaches the guest's DevTools port through the agent.

Chromium in the guest listens on its own loopback only (no guest network is
needed, and no other VM or the guest's network sees DevTools). Playwright
wants a TCP endpoint, so each tunnel is an asyncio server on ``127.0.0.1:0``
of the host; every connection it accepts becomes one ``tcp_connect`` stream
of the agent to the guest's port, bytes passed both ways with the stream's
credit (``stream_ack``) and EOF as a half close, as the SSH gateway's port
forwarding does (``kiln/sshd/forwarding.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from kiln.guest import protocol
from kiln.runtime.agent_client import NO_DEADLINE
from kiln.runtime.driver import AgentChannel
from kiln.runtime.errors import AgentError, AgentTimeout, AgentUnavailable

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
AGENT_FAILURES = (AgentError, AgentTimeout, AgentUnavailable)


class DevtoolsTunnel:
    """``http://127.0.0.1:<port>`` of the host is ``127.0.0.1:<guest_port>`` of one guest."""

    def __init__(self, agent: AgentChannel, guest_port: int) -> None:
        self._agent = agent
        self._guest_port = guest_port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._acks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        stream_id = "cdp-" + secrets.token_hex(8)
        frames = self._agent.stream(
            "tcp_connect", timeout=NO_DEADLINE, stream_id=stream_id, host="127.0.0.1", port=self._guest_port
        ).__aiter__()
        try:
            first = await frames.__anext__()
            if first.get("kind") != "connected":
                return
            inbound = asyncio.create_task(self._host_to_guest(reader, stream_id))
            try:
                await self._guest_to_host(frames, writer, stream_id)
            finally:
                inbound.cancel()
                with contextlib.suppress(*AGENT_FAILURES):
                    await self._agent.call("stream_close", stream_id=stream_id)
        except (*AGENT_FAILURES, StopAsyncIteration) as error:
            log.debug("devtools tunnel %s: %s", stream_id, error)
        except asyncio.CancelledError:
            # close() ends connections so; asyncio's server callback would report a cancelled task.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _ack(self, stream_id: str, size: int) -> None:
        with contextlib.suppress(*AGENT_FAILURES):
            await self._agent.call("stream_ack", stream_id=stream_id, bytes=size)

    async def _host_to_guest(self, reader: asyncio.StreamReader, stream_id: str) -> None:
        with contextlib.suppress(*AGENT_FAILURES, ConnectionError):
            while data := await reader.read(CHUNK_BYTES):
                await self._agent.call("stream_write", stream_id=stream_id, data=base64.b64encode(data).decode("ascii"))
            await self._agent.call("stream_write", stream_id=stream_id, eof=True)

    async def _guest_to_host(
        self, frames: AsyncIterator[dict[str, Any]], writer: asyncio.StreamWriter, stream_id: str
    ) -> None:
        with contextlib.suppress(*AGENT_FAILURES, ConnectionError):
            async for frame in frames:
                if frame.get("kind") == protocol.KIND_STDOUT:
                    data = base64.b64decode(frame.get("data") or "")
                    writer.write(data)
                    await writer.drain()
                    # Not waited for: the next frame need not wait a round trip to the guest.
                    ack = asyncio.create_task(self._ack(stream_id, len(data)))
                    self._acks.add(ack)
                    ack.add_done_callback(self._acks.discard)
            if writer.can_write_eof():
                writer.write_eof()
