"""Byte streams between the host and a process or a socket in the guest:
``exec`` with a ``stream_id`` (stdin fed as it arrives) and ``tcp_connect``
(a connection to a port of the guest itself), plus the ops that act on a
stream while its request runs (stream_write, stream_ack, stream_close).

Output is flow-controlled: a stream sends at most ``window`` bytes the host
has not acknowledged (``stream_ack``), so a slow host client holds the guest
back instead of filling the host's memory. Input is written by ``stream_write``
in the request's own thread; it blocks while the process does not read, and
``stream_close`` ends it (and the stream: the command is killed with its
process group, the connection closed).
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from .args import arg, b64_arg, timeout_arg
from .errors import AgentError
from .wire import Emit, Handler, b64, protocol

DEFAULT_WINDOW = 1024 * 1024
MAX_WINDOW = 16 * 1024 * 1024
# How often a blocked write looks whether its stream was closed meanwhile.
WRITE_POLL_SECONDS = 0.5
# tcp_connect reaches only the guest itself.
LOOPBACK_HOSTS = {"127.0.0.1": socket.AF_INET, "localhost": socket.AF_INET, "::1": socket.AF_INET6}
CONNECT_TIMEOUT_SECONDS = 10.0


def stream_id_arg(args: dict[str, Any]) -> str:
    stream_id = arg(args, "stream_id", str)
    if not 1 <= len(stream_id) <= 64 or not all(c.isalnum() or c in "._-" for c in stream_id):
        raise AgentError("EINVAL", "stream_id must be 1-64 letters, digits, '.', '_' or '-'")
    return stream_id


def window_arg(args: dict[str, Any]) -> int:
    window = arg(args, "window", int, DEFAULT_WINDOW)
    if not protocol.CHUNK_BYTES <= window <= MAX_WINDOW:
        raise AgentError("EINVAL", f"window must be between {protocol.CHUNK_BYTES} and {MAX_WINDOW}")
    return window


class Stream:
    """One stream's credit (bytes sent and not acknowledged) and its input end."""

    def __init__(self, stream_id: str, window: int) -> None:
        self.stream_id = stream_id
        self.window = window
        self.changed = threading.Condition()
        self.unacked = 0
        self.closed = False
        self.input_fd: int | None = None  # where stream_write writes (a pipe or a socket)
        self.on_eof: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None
        self.write_lock = threading.Lock()  # one stream_write at a time, in order

    def send(self, emit: Emit, kind: str, data: bytes) -> None:
        """Emit ``data`` as events, each no larger than a chunk nor than the credit
        left (never more than ``window`` unacknowledged); dropped once closed."""
        start = 0
        while start < len(data):
            with self.changed:
                self.changed.wait_for(lambda: self.closed or self.unacked < self.window)
                if self.closed:
                    return
                size = min(protocol.CHUNK_BYTES, self.window - self.unacked, len(data) - start)
                self.unacked += size
            emit({"kind": kind, "data": b64(data[start : start + size])})
            start += size

    def ack(self, count: int) -> None:
        with self.changed:
            self.unacked = max(self.unacked - count, 0)
            self.changed.notify_all()

    def write(self, data: bytes) -> None:
        """Write all of ``data`` to the input end; EPIPE when it is gone or the stream closed."""
        view = memoryview(data)
        with self.write_lock:
            while view:
                fd = self.input_fd
                if self.closed or fd is None:
                    raise AgentError("EPIPE", f"stream {self.stream_id} takes no more input")
                try:
                    _, writable, _ = select.select([], [fd], [], WRITE_POLL_SECONDS)
                    if writable:
                        view = view[os.write(fd, view) :]
                except BlockingIOError:
                    continue
                except (ValueError, OSError) as error:
                    raise AgentError("EPIPE", f"stream {self.stream_id}: {error}") from None

    def close(self) -> None:
        with self.changed:
            if self.closed:
                return
            self.closed = True
            self.changed.notify_all()
        self.on_close()


class Streams:
    """The live streams of the agent, by id, and the ops on them."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.lock = threading.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {
            "stream_write": self.op_stream_write,
            "stream_ack": self.op_stream_ack,
            "stream_close": self.op_stream_close,
            "tcp_connect": self.op_tcp_connect,
        }

    def register(self, args: dict[str, Any]) -> Stream:
        stream = Stream(stream_id_arg(args), window_arg(args))
        with self.lock:
            if stream.stream_id in self.streams:
                raise AgentError("EEXIST", f"stream {stream.stream_id!r} already exists")
            self.streams[stream.stream_id] = stream
        return stream

    def forget(self, stream: Stream) -> None:
        with self.lock:
            if self.streams.get(stream.stream_id) is stream:
                del self.streams[stream.stream_id]
        with stream.changed:
            stream.closed = True
            stream.changed.notify_all()

    def get(self, args: dict[str, Any]) -> Stream:
        stream_id = stream_id_arg(args)
        with self.lock:
            stream = self.streams.get(stream_id)
        if stream is None:
            raise AgentError("ENOENT", f"no stream {stream_id!r} (it ended)")
        return stream

    def op_stream_write(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"stream_id", "data" (b64)=empty, "eof"=false} -> {"written"}: input for the
        stream's process or connection, in order; with eof its input is closed after."""
        stream = self.get(args)
        data = b64_arg(args, "data", b"")
        if data:
            stream.write(data)
        if arg(args, "eof", bool, False):
            with stream.write_lock:
                stream.on_eof()
        return {"written": len(data)}

    def op_stream_ack(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"stream_id", "bytes"} -> {}: the host took that many bytes of output
        (an ended stream's late acknowledgements are no error)."""
        count = arg(args, "bytes", int)
        if count < 0:
            raise AgentError("EINVAL", "bytes must be >= 0")
        with self.lock:
            stream = self.streams.get(stream_id_arg(args))
        if stream is not None:
            stream.ack(count)
        return {}

    def op_stream_close(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"stream_id"} -> {"closed"}: the command is killed (its whole process group),
        the connection closed; false when the stream had already ended."""
        try:
            stream = self.get(args)
        except AgentError:
            return {"closed": False}
        stream.close()
        return {"closed": True}

    def op_tcp_connect(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"stream_id", "port", "host"="127.0.0.1" (a loopback name only), "window",
        "timeout"=10 (to connect)} -> a "connected" event, then the bytes the guest's
        server sends as stdout events, then {"bytes_in"} once it closed
        its end (or stream_close). A port nothing listens on is ECONNREFUSED.
        Input: stream_write (eof: a half close, the server reads its end)."""
        port = arg(args, "port", int)
        host = arg(args, "host", str, "127.0.0.1")
        if not 1 <= port <= 65535:
            raise AgentError("EINVAL", "port must be between 1 and 65535")
        family = LOOPBACK_HOSTS.get(host)
        if family is None:
            raise AgentError("EINVAL", f"tcp_connect reaches this guest only ({sorted(LOOPBACK_HOSTS)})")
        timeout = timeout_arg(args, CONNECT_TIMEOUT_SECONDS, 60.0)
        stream = self.register(args)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
            except ConnectionRefusedError:
                sock.close()
                raise AgentError("ECONNREFUSED", f"nothing listens on port {port} of this guest") from None
            except OSError as error:
                sock.close()
                raise AgentError("ECONNREFUSED", f"port {port} of this guest: {error}") from None
            sock.setblocking(True)
            return self._relay(stream, sock, emit)
        finally:
            self.forget(stream)

    def _relay(self, stream: Stream, sock: socket.socket, emit: Emit) -> dict[str, Any]:
        shut = threading.Lock()
        received = 0

        def eof() -> None:
            with shut:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        def close() -> None:
            with shut:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        stream.input_fd = sock.fileno()
        stream.on_eof = eof
        stream.on_close = close
        emit({"kind": "connected"})
        try:
            while True:
                try:
                    data = sock.recv(protocol.CHUNK_BYTES)
                except OSError:
                    data = b""
                if not data or stream.closed:
                    break
                received += len(data)
                stream.send(emit, protocol.KIND_STDOUT, data)
        finally:
            stream.input_fd = None
            with stream.write_lock:  # no write is on the socket while it closes
                sock.close()
        return {"bytes_in": received}
