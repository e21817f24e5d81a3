"""The gateway's end of its channel to guests: ``GuestLink``, one per SSH connection.

It talks to the server's guest relay (``kiln.services.guest_relay``) over
``sshd/server.sock`` in the agent's frames, many requests at once: ``open``
binds it to a VM (waking a suspended one that allows it), then each agent op
is a request whose frames come back by id. Closing the link (or this process
dying) makes the server end everything the link started in the guest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kiln.guest import protocol

# Frames held for one request that its reader has not taken (a slow SSH client):
# past this the request fails rather than the gateway's memory growing.
MAX_QUEUED_BYTES = 32 * 1024 * 1024
READ_BYTES = 256 * 1024
CONNECT_SECONDS = 5.0
# How long waking a suspended VM may take before the login is refused.
OPEN_SECONDS = 120.0


class GuestError(Exception):
    """An error frame: the agent's code (ENOENT, EPIPE, ...) or the relay's
    (ENOTOPEN, EUNAVAILABLE, ELOST when the server went away)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _Queue:
    def __init__(self) -> None:
        self.frames: asyncio.Queue[dict[str, Any] | GuestError] = asyncio.Queue()
        self.bytes = 0


class GuestLink:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.vm_id = ""
        self.session_id = ""
        self.workdir = "/"
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._queues: dict[int, _Queue] = {}
        self._ids = itertools.count(1)
        self._lost: GuestError | None = None
        self._write_lock = asyncio.Lock()

    async def open(self, vm_id: str, owner_id: int) -> None:
        """Connect to the server and bind to the VM (GuestError if it cannot run now)."""
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=protocol.MAX_FRAME_BYTES), CONNECT_SECONDS
            )
        except (OSError, TimeoutError) as error:
            raise GuestError("EUNAVAILABLE", f"the server is not reachable ({error})") from None
        self._reader_task = asyncio.create_task(self._read(reader), name=f"guest-link:{vm_id}")
        try:
            opened = await asyncio.wait_for(self.call("open", vm_id=vm_id, owner_id=owner_id), OPEN_SECONDS)
        except TimeoutError:
            raise GuestError("EUNAVAILABLE", f"vm {vm_id} did not come up in time") from None
        self.vm_id = str(opened["vm_id"])
        self.session_id = str(opened.get("session_id") or "")
        self.workdir = str(opened.get("workdir") or "/")

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request's result (events are dropped)."""
        result: dict[str, Any] = {}
        async for frame in self.stream(op, **args):
            if frame.get("kind") == protocol.KIND_RESULT:
                result = frame.get("value") or {}
        return result

    async def stream(self, op: str, **args: Any) -> AsyncIterator[dict[str, Any]]:
        """Each event frame, then the result frame; an error frame raises GuestError.
        Leaving early cancels the request at the server (not in the guest)."""
        request_id, queue = await self._start(op, args)
        finished = False
        try:
            while True:
                item = await queue.frames.get()
                if isinstance(item, GuestError):
                    finished = True
                    raise item
                queue.bytes -= len(item.get("data") or "")
                kind = item.get("kind")
                if kind == protocol.KIND_ERROR:
                    finished = True
                    raise GuestError(str(item.get("error")), str(item.get("message") or ""))
                finished = kind == protocol.KIND_RESULT
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                with contextlib.suppress(GuestError):
                    await self._send({"id": next(self._ids), "op": "cancel", "request": request_id})

    async def _start(self, op: str, args: dict[str, Any]) -> tuple[int, _Queue]:
        request_id = next(self._ids)
        queue = _Queue()
        self._queues[request_id] = queue
        try:
            await self._send({"id": request_id, "op": op, **args})
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        return request_id, queue

    async def _send(self, message: dict[str, Any]) -> None:
        if self._lost is not None:
            raise self._lost
        if self._writer is None:
            raise GuestError("ENOTOPEN", "the link is not open")
        async with self._write_lock:
            try:
                self._writer.write(protocol.encode_frame(message))
                await self._writer.drain()
            except (ConnectionError, RuntimeError) as error:
                self._lose(f"the server went away ({error})")
                raise self._lost or GuestError("ELOST", str(error)) from None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = protocol.FrameDecoder()
        reason = "the server closed the connection"
        try:
            while data := await reader.read(READ_BYTES):
                for body in decoder.feed(data):
                    frame = protocol.decode_body(body)
                    queue = self._queues.get(frame.get("id"))  # type: ignore[arg-type]
                    if queue is None:
                        continue  # a cancelled request's late frames
                    queue.bytes += len(frame.get("data") or "")
                    if queue.bytes > MAX_QUEUED_BYTES:
                        self._queues.pop(frame["id"], None)
                        queue.frames.put_nowait(GuestError("EOVERFLOW", "the SSH client fell too far behind"))
                        continue
                    queue.frames.put_nowait(frame)
        except (ConnectionError, ValueError) as error:
            reason = f"the server's stream broke ({error})"
        finally:
            self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self._lost is not None:
            return
        self._lost = GuestError("ELOST", reason)
        for queue in self._queues.values():
            queue.frames.put_nowait(self._lost)
        self._queues.clear()

    async def close(self) -> None:
        """End the link: the server ends what it started in the guest."""
        self._lose("the link was closed")
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(frame: dict[str, Any]) -> bytes:
    return base64.b64decode(frame.get("data") or "")
