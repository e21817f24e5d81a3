"""How the agent reaches the host: the virtio-serial port in a guest, a unix
socket (listening or inherited) on a developer host. Each yields one
``Connection`` per host connection; frames are written whole under one lock."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from .errors import ConnectionLost
from .wire import log, protocol

# While the host is not connected the port reports HUP; SIGIO wakes us when it
# connects, this is the fallback re-check interval.
RECONNECT_POLL_SECONDS = 0.5


class Connection:
    """One host connection over a non-blocking fd: whole-frame writes, raw reads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._write_lock = threading.Lock()
        self.closed = threading.Event()

    def read(self) -> bytes:
        """Bytes from the host; b"" once the host has gone."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self.closed.is_set():
            poller.poll()
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            except OSError as exc:
                log(f"read failed: {exc}")
                return b""
            return data
        return b""

    def send(self, message: dict[str, Any]) -> None:
        frame = protocol.encode_frame(message)
        with self._write_lock:
            if self.closed.is_set():
                raise ConnectionLost()
            view = memoryview(frame)
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            while view:
                try:
                    view = view[os.write(self.fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:  # EPIPE, ECONNRESET, ENODEV
                    self.closed.set()
                    raise ConnectionLost() from exc
                for _, events in poller.poll(1000):
                    # virtio-serial reports HUP while no host is connected: a
                    # half-written frame is abandoned rather than finished for
                    # whoever connects next.
                    if events & (select.POLLHUP | select.POLLERR):
                        self.closed.set()
                        raise ConnectionLost()


class Transport:
    """Yields one Connection per host connection, forever (or until it cannot)."""

    def connections(self) -> Iterator[Connection]:
        raise NotImplementedError

    def release(self, connection: Connection) -> None:
        """Called once a connection has ended."""


class InheritedSocket(Transport):
    """``--fd N``: one already-connected socket; the agent exits when it closes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def connections(self) -> Iterator[Connection]:
        yield Connection(self.fd)

    def release(self, connection: Connection) -> None:
        os.close(connection.fd)


class ListeningSocket(Transport):
    """``--socket PATH``: accept host connections one after another."""

    def __init__(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)

    def connections(self) -> Iterator[Connection]:
        while True:
            client, _ = self.listener.accept()
            yield Connection(client.detach())

    def release(self, connection: Connection) -> None:
        os.close(connection.fd)


class VirtioPort(Transport):
    """The virtio-serial port. It stays open across host disconnects.

    While no host is connected, reads return EOF at once and poll() reports HUP;
    the kernel sends SIGIO when a host connects, which wakes the wait below.
    SIGIO is only asked for while waiting: it also fires on every arriving byte."""

    def __init__(self) -> None:
        self.fd = os.open(find_virtio_port(), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGIO, lambda *_: None)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())

    def _host_connected(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLOUT)
        return not any(events & select.POLLHUP for _, events in poller.poll(0))

    def _signal_on_io(self, enabled: bool) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_ASYNC if enabled else flags & ~os.O_ASYNC)

    def connections(self) -> Iterator[Connection]:
        while True:
            # Enabled before the first check, so a connect in between still wakes us.
            self._signal_on_io(True)
            while not self._host_connected():
                select.select([self._wakeup_read], [], [], RECONNECT_POLL_SECONDS)
                try:
                    os.read(self._wakeup_read, 4096)
                except BlockingIOError:
                    pass
            self._signal_on_io(False)
            yield Connection(self.fd)

    def release(self, connection: Connection) -> None:
        """The port fd is kept: the next host connection uses it again."""


def find_virtio_port() -> str:
    if os.path.exists(protocol.GUEST_PORT_PATH):
        return protocol.GUEST_PORT_PATH
    # No udev in the guest, so no /dev/virtio-ports symlinks: match by sysfs name.
    ports_dir = "/sys/class/virtio-ports"
    for port in os.listdir(ports_dir) if os.path.isdir(ports_dir) else []:
        with open(os.path.join(ports_dir, port, "name")) as name_file:
            if name_file.read().strip() == protocol.AGENT_PORT_NAME:
                return "/dev/" + port
    raise FileNotFoundError(f"no virtio port named {protocol.AGENT_PORT_NAME}")

