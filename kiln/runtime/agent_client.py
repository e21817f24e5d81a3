"""Host side of the guest agent protocol (see ``kiln.guest.protocol``).

One ``AgentClient`` holds one connection to a VM's agent port (the unix socket
QEMU exposes for the ``kiln.agent`` virtio-serial port) and runs many requests
over it at once: every request gets an id, a reader task reads frames and hands
each to the queue of the request it names.

If the connection drops (the VM died, was restored into a new process, or the
peer restarted), every request in flight fails with ``AgentUnavailable`` and the
next request opens a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from kiln.guest import protocol
from kiln.runtime.errors import AgentError, AgentTimeout, AgentUnavailable

log = logging.getLogger(__name__)

# Ops whose ``timeout`` argument the agent itself enforces; for them the host
# forwards ``timeout`` and waits a little longer, so the agent's own result
# (``timed_out: true`` with the output so far) arrives instead of a host timeout.
OPS_WITH_GUEST_TIMEOUT = frozenset(
    {"exec", "python_exec", "net_config", "mount", "umount", "fsfreeze", "fsthaw", "disk_usage"}
)
RESULT_GRACE_SECONDS = 5.0

# Every request has a deadline: a wedged or hostile guest gets its caller an
# AgentTimeout, never an endless wait. Calls that name no timeout get this one;
# a stream that is meant to last (a terminal's output) asks for NO_DEADLINE.
DEFAULT_DEADLINE_SECONDS = 30.0
NO_DEADLINE = math.inf

# How long one ping may take while waiting for a booting guest before it is
# sent again; unanswered pings are harmless (their late answers are dropped).
READY_PING_SECONDS = 2.0
CONNECT_RETRY_SECONDS = 0.05
# An implicit reconnect (a call after the connection dropped) tries this long.
RECONNECT_SECONDS = 2.0
# How much of the agent stream one read takes; frames span reads freely.
READ_BYTES = 256 * 1024


# The guest is hostile: what it may make the host hold or do.
# Frames received for one request and not yet taken by its caller (a slow
# terminal client): past this the request fails, the server's memory stays flat.
MAX_QUEUED_BYTES = 32 * 1024 * 1024
# Frames nobody asked for (late answers to requests that gave up are normal:
# an exec cut by a host deadline keeps sending up to its output cap).
STRAY_WINDOW_SECONDS = 10.0
MAX_STRAY_BYTES = 64 * 1024 * 1024
# Bytes that are no frame at all (one torn frame after a reconnect is normal).
MAX_GARBAGE_BYTES = 1024 * 1024
# Bodies this large are decoded off the event loop.
THREAD_DECODE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _ConnectionLost:
    reason: str


class _Pending:
    """The frames of one request, held until its caller takes them."""

    def __init__(self) -> None:
        self._frames: collections.deque[tuple[dict, int]] = collections.deque()
        self._bytes = 0
        self._failure: str | None = None
        self._arrived = asyncio.Event()

    def offer(self, frame: dict, size: int) -> bool:
        """Hold a frame; False (and the request failed) past ``MAX_QUEUED_BYTES``."""
        if self._failure is not None:
            return True
        if self._bytes + size > MAX_QUEUED_BYTES:
            self.fail(f"its caller fell more than {MAX_QUEUED_BYTES >> 20} MiB behind the guest")
            return False
        self._frames.append((frame, size))
        self._bytes += size
        self._arrived.set()
        return True

    def fail(self, reason: str) -> None:
        self._failure = reason
        self._frames.clear()
        self._bytes = 0
        self._arrived.set()

    async def take(self) -> dict | _ConnectionLost:
        while not self._frames:
            if self._failure is not None:
                return _ConnectionLost(self._failure)
            self._arrived.clear()
            await self._arrived.wait()
        frame, size = self._frames.popleft()
        self._bytes -= size
        return frame


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, _Pending] = field(default_factory=dict)
    reader_task: asyncio.Task[None] | None = None
    lost_reason: str | None = None
    # (monotonic time, bytes) of frames nobody asked for, in the last window.
    stray: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    @property
    def alive(self) -> bool:
        return self.lost_reason is None

    def lose(self, reason: str) -> None:
        """Mark the connection dead and fail everything waiting on it."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        for pending in self.pending.values():
            pending.fail(reason)
        self.pending.clear()
        self.writer.close()

    def note_stray(self, size: int) -> int:
        """Count a frame nobody asked for; the bytes of such frames in the window."""
        now = time.monotonic()
        self.stray.append((now, size))
        while self.stray and self.stray[0][0] < now - STRAY_WINDOW_SECONDS:
            self.stray.popleft()
        return sum(bytes_ for _, bytes_ in self.stray)


class AgentClient:
    def __init__(self, socket_path: str | Path, default_deadline: float = DEFAULT_DEADLINE_SECONDS) -> None:
        self.socket_path = Path(socket_path)
        self.default_deadline = default_deadline
        # Set when the guest broke the protocol's limits: its agent is not talked
        # to again (the VM service fails the VM with this reason).
        self.misbehaving: str | None = None
        self._connection: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        # Start at a random id so replies meant for an earlier server's requests
        # (still in the guest's queue after a restart) match nothing here.
        self._request_ids = itertools.count(secrets.randbelow(1 << 30) + 1)

    def __repr__(self) -> str:
        return f"AgentClient({str(self.socket_path)!r}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.alive

    @property
    def in_flight(self) -> int:
        return len(self._connection.pending) if self._connection is not None else 0

    async def connect(self, timeout: float = RECONNECT_SECONDS) -> None:
        """Open the connection, retrying until ``timeout`` while the socket is not there yet."""
        async with self._connect_lock:
            if self.connected:
                return
            if self.misbehaving is not None:
                raise AgentUnavailable(self.misbehaving)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        str(self.socket_path), limit=protocol.MAX_FRAME_BYTES + protocol.HEADER.size
                    )
                    break
                except OSError as error:
                    if time.monotonic() + CONNECT_RETRY_SECONDS >= deadline:
                        raise AgentUnavailable(
                            f"cannot connect to the agent socket {self.socket_path}: {error}"
                        ) from error
                    await asyncio.sleep(CONNECT_RETRY_SECONDS)
            connection = _Connection(reader, writer)
            connection.reader_task = asyncio.create_task(
                self._read_frames(connection), name=f"agent-reader:{self.socket_path}"
            )
            self._connection = connection

    async def wait_ready(self, timeout: float) -> dict:
        """Wait until the agent answers a ping; returns the ping's value.

        Meant for a booting guest: the socket may not exist yet and the agent may
        not have opened its port yet, so both connecting and pinging are retried.
        """
        deadline = time.monotonic() + timeout
        last_problem = "no attempt finished"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentUnavailable(
                    f"the agent did not answer within {timeout:g}s ({last_problem})"
                )
            try:
                await self.connect(timeout=remaining)
                return await self.call("ping", timeout=min(READY_PING_SECONDS, remaining))
            except (AgentUnavailable, AgentTimeout) as problem:
                last_problem = str(problem)
                await asyncio.sleep(min(CONNECT_RETRY_SECONDS, max(remaining, 0)))

    async def call(self, op: str, timeout: float | None = None, **args: object) -> dict:
        """Run one request and return its final ``value``.

        ``timeout`` bounds the wait on the host (default: ``default_deadline``).
        For ops the agent times itself (exec, python_exec) it is also passed to
        the agent, and the host waits a grace period longer so the agent's own
        ``timed_out`` result comes back.
        Raises ``AgentError`` for an error frame, ``AgentUnavailable`` if the
        connection is lost, ``AgentTimeout`` if no answer came in time.
        Events (stdout/stderr) are discarded; use ``stream`` to see them.
        """
        result: dict = {}
        async for frame in self.stream(op, timeout=timeout, **args):
            if frame.get("kind") == protocol.KIND_RESULT:
                result = frame.get("value") or {}
        return result

    async def stream(
        self, op: str, timeout: float | None = None, **args: object
    ) -> AsyncIterator[dict]:
        """Run one request, yielding each event frame and finally the result frame.

        An error frame raises ``AgentError`` instead of being yielded. Time limits
        as in ``call``; the limit covers the whole stream, not each frame.
        """
        if timeout is None:
            timeout = self.default_deadline
        host_timeout = timeout
        if op in OPS_WITH_GUEST_TIMEOUT and math.isfinite(timeout):
            args["timeout"] = timeout
            host_timeout = timeout + RESULT_GRACE_SECONDS
        deadline = time.monotonic() + host_timeout

        def remaining() -> float | None:
            return None if math.isinf(deadline) else max(deadline - time.monotonic(), 0.0)

        def timed_out() -> AgentTimeout:
            return AgentTimeout(f"agent op {op!r} got no answer within {host_timeout:g}s")

        try:
            connection = await asyncio.wait_for(self._live_connection(), remaining())
        except TimeoutError:
            raise timed_out() from None
        request_id = next(self._request_ids)
        pending = _Pending()
        connection.pending[request_id] = pending
        try:
            try:
                # A guest that stopped reading fills the channel: the write waits too.
                await asyncio.wait_for(self._send(connection, {"id": request_id, "op": op, **args}), remaining())
            except TimeoutError:
                # A frame may be half-written: this connection is done.
                connection.lose("the agent stopped reading")
                raise timed_out() from None
            while True:
                try:
                    item = await asyncio.wait_for(pending.take(), remaining())
                except TimeoutError:
                    raise timed_out() from None
                if isinstance(item, _ConnectionLost):
                    raise AgentUnavailable(f"agent connection lost during {op!r}: {item.reason}")
                kind = item.get("kind")
                if kind == protocol.KIND_ERROR:
                    raise AgentError(
                        str(item.get("error", "EUNKNOWN")), str(item.get("message", ""))
                    )
                yield item
                if kind == protocol.KIND_RESULT:
                    return
        finally:
            connection.pending.pop(request_id, None)

    def _misbehave(self, connection: _Connection, why: str) -> None:
        self.misbehaving = f"the guest agent broke the protocol: {why}"
        log.warning("%s: %s", self.socket_path, self.misbehaving)
        connection.lose(self.misbehaving)

    async def close(self) -> None:
        """Drop the connection; requests in flight fail. A later call reconnects."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.lose("the client was closed")
        if connection.reader_task is not None:
            connection.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection.reader_task
        with contextlib.suppress(OSError):
            await connection.writer.wait_closed()

    async def _live_connection(self) -> _Connection:
        if not self.connected:
            await self.connect(timeout=RECONNECT_SECONDS)
        assert self._connection is not None
        return self._connection

    async def _send(self, connection: _Connection, message: dict) -> None:
        frame = protocol.encode_frame(message)
        async with self._write_lock:
            if not connection.alive:
                raise AgentUnavailable(f"agent connection lost: {connection.lost_reason}")
            try:
                connection.writer.write(frame)
                await connection.writer.drain()
            except (OSError, RuntimeError) as error:
                # RuntimeError: asyncio refuses to write to a transport it closed.
                connection.lose(f"write failed: {error}")
                raise AgentUnavailable(f"agent connection lost: {error}") from error

    async def _read_frames(self, connection: _Connection) -> None:
        reason = "the agent closed the connection"
        # The decoder resynchronises past a frame the guest was half-way through
        # writing when an earlier host connection went away.
        decoder = protocol.FrameDecoder()
        try:
            while data := await connection.reader.read(READ_BYTES):
                for body in decoder.feed(data):
                    if len(body) > THREAD_DECODE_BYTES:
                        frame = await asyncio.to_thread(protocol.decode_body, body)
                    else:
                        frame = protocol.decode_body(body)
                    request_id = frame.get("id")
                    pending = connection.pending.get(request_id) if isinstance(request_id, int) else None
                    if pending is None or not isinstance(request_id, int):
                        # A late answer to a request that gave up (a retried ping), or
                        # to one sent over an earlier connection.
                        if connection.note_stray(len(body)) > MAX_STRAY_BYTES:
                            self._misbehave(connection, "it sends frames nobody asked for, without end")
                            return
                        continue
                    if not pending.offer(frame, len(body)):
                        del connection.pending[request_id]
                if decoder.discarded > MAX_GARBAGE_BYTES:
                    self._misbehave(connection, f"it sent more than {MAX_GARBAGE_BYTES >> 20} MiB that are no frames")
                    return
        except asyncio.CancelledError:
            reason = "the client was closed"
            raise
        except (OSError, ValueError) as error:
            # ValueError: a whole frame whose body is not a JSON object.
            reason = f"unreadable agent stream: {error}"
        finally:
            connection.lose(reason)
