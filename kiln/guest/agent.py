"""The Kiln guest agent: serves the host's requests inside the VM.

Stdlib only. In a guest it is started (and respawned) by PID 1 and talks to the
host over the virtio-serial port ``kiln.agent``. On a developer host it serves a
unix socket (``--socket PATH``) or an inherited socket (``--fd N``) instead, which
is how the unit tests drive it.

Every request runs in its own thread, so a slow ``exec`` never delays a ``ping``;
frames are written whole under one lock. The frame format is in ``protocol.py``.
"""

from __future__ import annotations

import argparse
import base64
import errno
import fcntl
import json
import os
import random
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

# In a guest the agent runs as the top-level module ``agent`` next to
# protocol.py (``python3 -m agent`` with /opt/kiln on the path, so its bytecode
# is precompiled); on a host it is ``kiln.guest.agent`` or a plain script.
try:
    from kiln.guest import protocol
except ImportError:  # pragma: no cover - the in-guest layout
    import protocol  # type: ignore[no-redef]

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}
DEFAULT_OUTPUT_LIMIT = 10 * 1024 * 1024
# A command's output pipes stay open while its background children live; after
# the command itself exits we keep collecting for this long, then let it go.
BACKGROUND_OUTPUT_GRACE = 1.0
MAX_READ_BYTES = 8 * 1024 * 1024  # base64 of this still fits a frame
# While the host is not connected the port reports HUP; SIGIO wakes us when it
# connects, this is the fallback re-check interval.
RECONNECT_POLL_SECONDS = 0.5

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the kernel generator now
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC

ERRNO_CODES = {
    errno.ENOENT: "ENOENT",
    errno.EISDIR: "EISDIR",
    errno.ENOTDIR: "ENOTDIR",
    errno.EEXIST: "EEXIST",
    errno.EACCES: "EACCES",
    errno.EPERM: "EACCES",
    errno.EROFS: "EACCES",
    errno.EINVAL: "EINVAL",
    errno.ENAMETOOLONG: "EINVAL",
}


def log(message: str) -> None:
    print(f"kiln-agent: {message}", file=sys.stderr, flush=True)


class AgentError(Exception):
    """A request failed in a way the host should see as ``{"kind": "error"}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionLost(Exception):
    """The host went away while we were writing to it."""


def error_from_oserror(exc: OSError) -> AgentError:
    code = ERRNO_CODES.get(exc.errno or 0, "EINTERNAL")
    return AgentError(code, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


# ---------------------------------------------------------------- arguments

_REQUIRED = object()


def arg(args: dict, name: str, kind: type | tuple[type, ...], default: object = _REQUIRED):
    """One validated request argument; a missing or mistyped one is EINVAL."""
    if name not in args or args[name] is None:
        if default is _REQUIRED:
            raise AgentError("EINVAL", f"missing argument {name!r}")
        return default
    value = args[name]
    # bool is an int subclass: an int argument must not silently accept true.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise AgentError("EINVAL", f"argument {name!r} must be {kind}")
    if not isinstance(value, kind):
        raise AgentError("EINVAL", f"argument {name!r} must be {kind}")
    return value


def b64_arg(args: dict, name: str, default: bytes | None = None) -> bytes:
    text = arg(args, name, str, None)
    if text is None:
        if default is None:
            raise AgentError("EINVAL", f"missing argument {name!r}")
        return default
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise AgentError("EINVAL", f"argument {name!r} is not base64: {exc}") from None


def env_arg(args: dict, name: str) -> dict[str, str]:
    env = arg(args, name, dict, {})
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or not isinstance(value, str) or "\0" in value:
            raise AgentError("EINVAL", f"bad environment entry {key!r}")
    return env


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- transports


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

    def send(self, message: dict) -> None:
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


# ---------------------------------------------------------------- process output


class OutputSink:
    """Streams a request's output as events, up to a byte limit shared by both streams."""

    def __init__(self, emit: Callable[[dict], None], limit: int) -> None:
        self._emit = emit
        self.remaining = limit
        self.truncated = False

    def write(self, kind: str, data: bytes) -> None:
        if len(data) > self.remaining:
            data = data[: self.remaining]
            self.truncated = True
        if not data:
            return
        self.remaining -= len(data)
        for start in range(0, len(data), protocol.CHUNK_BYTES):
            self._emit({"kind": kind, "data": b64(data[start : start + protocol.CHUNK_BYTES])})


def discard_until_eof(pipes: list) -> None:
    """Drain pipes in the background so writers never get SIGPIPE, then close them."""

    def drain() -> None:
        with selectors.DefaultSelector() as selector:
            for pipe in pipes:
                selector.register(pipe, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    if not os.read(key.fd, 65536):
                        selector.unregister(key.fileobj)
                        key.fileobj.close()

    threading.Thread(target=drain, name="discard-output", daemon=True).start()


def exit_code_of(status: int) -> int:
    """A wait status as a number: the exit code, or minus the signal that killed it."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# ---------------------------------------------------------------- python sessions

# Runs in a child interpreter, one per session. Code arrives on fd argv[1] as a
# 4-byte length + UTF-8 source; after each cell a JSON status line goes to
# fd argv[2]. stdout/stderr are the cell's output, streamed by the agent.
PYTHON_SESSION_DRIVER = r"""
import json, linecache, os, struct, sys, traceback
control_in, control_out = int(sys.argv[1]), int(sys.argv[2])
sys.argv = [""]
namespace = {"__name__": "__main__", "__builtins__": __builtins__}

def read_exact(count):
    data = b""
    while len(data) < count:
        chunk = os.read(control_in, count - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data

cell = 0
while True:
    source = read_exact(struct.unpack(">I", read_exact(4))[0]).decode("utf-8")
    cell += 1
    filename = f"<cell {cell}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    before = os.times()
    failed = False
    try:
        exec(compile(source, filename, "exec"), namespace)
    except SystemExit as exc:
        failed = exc.code not in (None, 0)
    except BaseException as exc:
        failed = True
        # Skip this driver's own frame: the user's code is all they need to see.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    after = os.times()
    cpu = sum(after[:4]) - sum(before[:4])
    os.write(control_out, (json.dumps({"failed": failed, "cpu_time": cpu}) + "\n").encode())
"""

# Run in every session after a restore: clones must not share random state.
RESEED_SOURCE = "import sys\nif 'random' in sys.modules: sys.modules['random'].seed()\n"


class PythonSession:
    """A persistent child interpreter: globals survive from one cell to the next."""

    def __init__(self, env: dict[str, str], cwd: str | None) -> None:
        self.lock = threading.Lock()
        code_read, self._code_write = os.pipe()
        self._status_read, status_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", PYTHON_SESSION_DRIVER, str(code_read), str(status_write)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(code_read, status_write),
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        os.close(code_read)
        os.close(status_write)
        self._status_buffer = b""

    def run(self, source: str, sink: OutputSink, deadline: float | None) -> tuple[str, float]:
        """Run one cell: returns ("ok" | "failed" | "timeout" | "died", cpu_time)."""
        encoded = source.encode("utf-8")
        try:
            os.write(self._code_write, struct.pack(">I", len(encoded)))
            self._write_all(encoded)
        except BrokenPipeError:
            return "died", 0.0
        streams = {self.process.stdout.fileno(): protocol.KIND_STDOUT,
                   self.process.stderr.fileno(): protocol.KIND_STDERR}
        with selectors.DefaultSelector() as selector:
            for fd in streams:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(self._status_read, selectors.EVENT_READ)
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = selector.select(timeout)
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    return "timeout", 0.0
                for key, _ in ready:
                    if key.fd in streams:
                        data = os.read(key.fd, protocol.CHUNK_BYTES)
                        if data:
                            sink.write(streams[key.fd], data)
                        else:
                            selector.unregister(key.fd)
                        continue
                    chunk = os.read(self._status_read, 4096)
                    if not chunk:
                        self._forward_pending(streams, sink)
                        return "died", 0.0
                    self._status_buffer += chunk
                    if b"\n" in self._status_buffer:
                        line, self._status_buffer = self._status_buffer.split(b"\n", 1)
                        # Output written before the status line is already in the
                        # pipes; collect it so it is not attributed to the next cell.
                        self._forward_pending(streams, sink)
                        status = json.loads(line)
                        return ("failed" if status["failed"] else "ok"), status["cpu_time"]

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._code_write, view) :]

    @staticmethod
    def _forward_pending(streams: dict[int, str], sink: OutputSink) -> None:
        for fd, kind in streams.items():
            os.set_blocking(fd, False)
            try:
                while data := os.read(fd, protocol.CHUNK_BYTES):
                    sink.write(kind, data)
            except BlockingIOError:
                pass
            finally:
                os.set_blocking(fd, True)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for fd in (self._code_write, self._status_read):
            os.close(fd)
        self.process.stdout.close()
        self.process.stderr.close()


# ---------------------------------------------------------------- pseudo-terminals

# Output kept per terminal: replayed to whoever attaches, and the slack a slow
# host has before it misses output (it then skips ahead; the shell never blocks).
PTY_SCROLLBACK_BYTES = 256 * 1024
PTY_MAX_SIZE = 1000  # columns or rows
PTY_KILL_GRACE_SECONDS = 1.0
MAX_ENDED_TERMINALS = 32  # ended terminals kept for their exit code


def set_window_size(fd: int, cols: int, rows: int) -> None:
    import termios  # here, as ctypes above: only PTY users pay for it

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def take_controlling_terminal() -> None:
    """Runs in the child between fork and exec (after setsid): make stdin, the
    PTY's slave side, the session's controlling terminal, so job control and
    ^C reach the shell's foreground job."""
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def terminal_size_arg(args: dict, name: str, default: int) -> int:
    value = arg(args, name, int, default)
    if not 1 <= value <= PTY_MAX_SIZE:
        raise AgentError("EINVAL", f"{name} must be between 1 and {PTY_MAX_SIZE}")
    return value


class Terminal:
    """A process on a pseudo-terminal, its output kept in a scrollback buffer.

    A reader thread moves output from the PTY into the buffer; each attached
    host request follows the buffer at its own position. Output is counted
    from the terminal's start, so a position says exactly what one has seen."""

    def __init__(self, pty_id: str, argv: list[str], env: dict[str, str], cwd: str | None,
                 cols: int, rows: int) -> None:
        self.pty_id = pty_id
        self.argv = argv
        self.cols, self.rows = cols, rows
        self.created_at = time.time()
        master, slave = os.openpty()
        try:
            set_window_size(master, cols, rows)
            self.process = subprocess.Popen(
                argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                start_new_session=True, preexec_fn=take_controlling_terminal,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        self.changed = threading.Condition()
        self.scrollback = bytearray()
        self.produced = 0  # bytes of output since the start
        self.exit_code: int | None = None
        self.detached: set[str] = set()
        threading.Thread(target=self._pump_output, name=f"pty-{pty_id}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def info(self) -> dict:
        return {
            "pty_id": self.pty_id, "pid": self.process.pid, "argv": self.argv,
            "cols": self.cols, "rows": self.rows, "alive": self.alive,
            "exit_code": self.exit_code, "created_at": self.created_at,
        }

    def _pump_output(self) -> None:
        while True:
            try:
                data = os.read(self.master, protocol.CHUNK_BYTES)
            except OSError:  # EIO: every slave side is closed, the session is over
                data = b""
            if not data:
                break
            with self.changed:
                self.scrollback += data
                del self.scrollback[: max(len(self.scrollback) - PTY_SCROLLBACK_BYTES, 0)]
                self.produced += len(data)
                self.changed.notify_all()
        exit_code = exit_code_of(os.waitpid(self.process.pid, 0)[1])
        self.process.returncode = exit_code  # reaped here: Popen must not wait again
        with self.changed:
            self.exit_code = exit_code
            os.close(self.master)
            self.changed.notify_all()

    def follow(self, attach_id: str, replay: bool, emit: Callable[[dict], None]) -> dict:
        """Emit output as it comes until the process ends or the host detaches."""
        with self.changed:
            position = self.produced - (len(self.scrollback) if replay else 0)
        while True:
            with self.changed:
                self.changed.wait_for(
                    lambda: self.produced > position or not self.alive or attach_id in self.detached
                )
                if attach_id in self.detached:
                    self.detached.discard(attach_id)
                    return {"exit_code": self.exit_code, "detached": True}
                start = self.produced - len(self.scrollback)
                data = bytes(self.scrollback[max(position - start, 0):])
                position = self.produced
                ended = not self.alive and not data
            if ended:
                return {"exit_code": self.exit_code, "detached": False}
            for offset in range(0, len(data), protocol.CHUNK_BYTES):
                emit({"kind": protocol.KIND_STDOUT,
                      "data": b64(data[offset : offset + protocol.CHUNK_BYTES])})

    def detach(self, attach_id: str) -> None:
        with self.changed:
            self.detached.add(attach_id)
            self.changed.notify_all()

    def write(self, data: bytes) -> None:
        with self.changed:
            if not self.alive:
                raise AgentError("EPIPE", f"terminal {self.pty_id} has ended")
            master = self.master
        view = memoryview(data)
        while view:
            view = view[os.write(master, view):]

    def resize(self, cols: int, rows: int) -> None:
        with self.changed:
            if not self.alive:
                raise AgentError("EPIPE", f"terminal {self.pty_id} has ended")
            # The kernel sends SIGWINCH to the foreground job.
            set_window_size(self.master, cols, rows)
            self.cols, self.rows = cols, rows

    def kill(self) -> None:
        """SIGHUP (a terminal hanging up), then SIGKILL if the job lingers. Gives up
        waiting after that: a job in another process group may hold the PTY open."""
        for sig in (signal.SIGHUP, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            with self.changed:
                if self.changed.wait_for(lambda: not self.alive, PTY_KILL_GRACE_SECONDS):
                    return


class Terminals:
    """The agent's pseudo-terminals and their ops (pty_open, pty_attach, ...)."""

    def __init__(self, exec_env: Callable[[dict[str, str]], dict[str, str]], workdir: str | None) -> None:
        self.exec_env = exec_env
        self.workdir = workdir
        self.terminals: dict[str, Terminal] = {}
        self.lock = threading.Lock()

    def handlers(self) -> dict[str, Callable[[dict, Callable[[dict], None]], dict]]:
        return {
            "pty_open": self.op_pty_open, "pty_attach": self.op_pty_attach,
            "pty_detach": self.op_pty_detach, "pty_write": self.op_pty_write,
            "pty_resize": self.op_pty_resize, "pty_kill": self.op_pty_kill,
            "pty_list": self.op_pty_list,
        }

    def get(self, args: dict) -> Terminal:
        pty_id = arg(args, "pty_id", str)
        with self.lock:
            terminal = self.terminals.get(pty_id)
        if terminal is None:
            raise AgentError("ENOENT", f"no terminal {pty_id!r}")
        return terminal

    def op_pty_open(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"cols"=80, "rows"=24, "command" (run by /bin/bash -lc) | "shell" (exec'd
        directly), "env", "pty_id"} -> the terminal's info. Without either, an
        interactive login bash (sh where bash is missing)."""
        cols = terminal_size_arg(args, "cols", 80)
        rows = terminal_size_arg(args, "rows", 24)
        command, shell = arg(args, "command", str, None), arg(args, "shell", str, None)
        if command is not None:
            argv = ["/bin/bash", "-lc", command]
        elif shell is not None:
            argv = [shell]
        else:
            argv = ["/bin/bash", "-il"] if os.path.exists("/bin/bash") else ["/bin/sh", "-i"]
        env = self.exec_env({"TERM": "xterm-256color", **env_arg(args, "env")})
        pty_id = arg(args, "pty_id", str, None) or "pty-" + os.urandom(6).hex()
        if not 1 <= len(pty_id) <= 64 or not all(c.isalnum() or c in "._-" for c in pty_id):
            raise AgentError("EINVAL", "pty_id must be 1-64 letters, digits, '.', '_' or '-'")
        with self.lock:
            existing = self.terminals.get(pty_id)
            if existing is not None and existing.alive:
                raise AgentError("EEXIST", f"terminal {pty_id!r} already exists")
            try:
                terminal = Terminal(pty_id, argv, env, self.workdir, cols, rows)
            except FileNotFoundError:
                raise AgentError("ENOENT", f"command not found: {argv[0]}") from None
            self.terminals[pty_id] = terminal
            self._forget_oldest_ended()
        return terminal.info()

    def _forget_oldest_ended(self) -> None:
        ended = sorted((t for t in self.terminals.values() if not t.alive), key=lambda t: t.created_at)
        for terminal in ended[: max(len(ended) - MAX_ENDED_TERMINALS, 0)]:
            del self.terminals[terminal.pty_id]

    def op_pty_attach(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"pty_id", "attach_id", "replay"=true} -> output as stdout events until the
        process ends or pty_detach names this attach_id; then {"exit_code", "detached"}.
        With replay, the scrollback comes first."""
        terminal = self.get(args)
        return terminal.follow(arg(args, "attach_id", str), arg(args, "replay", bool, True), emit)

    def op_pty_detach(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"pty_id", "attach_id"} -> {}: ends that pty_attach request."""
        self.get(args).detach(arg(args, "attach_id", str))
        return {}

    def op_pty_write(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"pty_id", "data" (b64)} -> {"written"}: keyboard input."""
        data = b64_arg(args, "data")
        self.get(args).write(data)
        return {"written": len(data)}

    def op_pty_resize(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"pty_id", "cols", "rows"} -> the terminal's info."""
        terminal = self.get(args)
        terminal.resize(terminal_size_arg(args, "cols", terminal.cols),
                        terminal_size_arg(args, "rows", terminal.rows))
        return terminal.info()

    def op_pty_kill(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"pty_id"} -> the terminal's last info; it is then forgotten."""
        terminal = self.get(args)
        terminal.kill()
        with self.lock:
            if self.terminals.get(terminal.pty_id) is terminal:
                del self.terminals[terminal.pty_id]
        return terminal.info()

    def op_pty_list(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{} -> {"ptys": [info, ...]}, oldest first; ended ones too."""
        with self.lock:
            terminals = sorted(self.terminals.values(), key=lambda t: t.created_at)
        return {"ptys": [terminal.info() for terminal in terminals]}


# ---------------------------------------------------------------- the agent


class Agent:
    def __init__(self, *, workdir: str | None, etc_dir: str, system: bool) -> None:
        self.workdir = workdir
        self.etc_dir = etc_dir
        # False on a developer host: never touch its clock, hostname or power.
        self.system = system
        self.started = time.monotonic()
        self.env_overrides: dict[str, str] = {}
        self.env_lock = threading.Lock()
        self.sessions: dict[str, PythonSession] = {}
        self.sessions_lock = threading.Lock()
        self.handlers: dict[str, Callable[[dict, Callable[[dict], None]], dict]] = {
            "ping": self.op_ping,
            "exec": self.op_exec,
            "write_file": self.op_write_file,
            "read_file": self.op_read_file,
            "stat": self.op_stat,
            "list": self.op_list,
            "set_env": self.op_set_env,
            "post_restore": self.op_post_restore,
            "set_clock": self.op_set_clock,
            "python_exec": self.op_python_exec,
            "shutdown": self.op_shutdown,
        }
        self.terminals = Terminals(self.exec_env, workdir)
        self.handlers.update(self.terminals.handlers())

    # ---- serving

    def serve(self, transport: Transport) -> None:
        for connection in transport.connections():
            log("host connected")
            try:
                self.serve_connection(connection)
            finally:
                connection.closed.set()
                transport.release(connection)
            log("host disconnected")

    def serve_connection(self, connection: Connection) -> None:
        # A fresh decoder per connection; within one, it also recovers from a
        # torn frame left by a host that reconnected before we saw it leave.
        decoder = protocol.FrameDecoder()
        while True:
            data = connection.read()
            if not data:
                return
            discarded = decoder.discarded
            bodies = decoder.feed(data)
            if decoder.discarded != discarded:
                log(f"skipped {decoder.discarded - discarded} bytes of a torn frame")
            for body in bodies:
                self.dispatch(body, connection)

    def dispatch(self, body: bytes, connection: Connection) -> None:
        try:
            request = protocol.decode_body(body)
        except (ValueError, protocol.FrameError) as exc:
            log(f"bad frame: {exc}")
            return
        request_id = request.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            log(f"frame without an integer id ignored: op={request.get('op')!r}")
            return
        threading.Thread(
            target=self.handle, args=(request, connection), name=f"request-{request_id}", daemon=True
        ).start()

    def handle(self, request: dict, connection: Connection) -> None:
        request_id = request["id"]

        def emit(frame: dict) -> None:
            connection.send({"id": request_id, **frame})

        op = request.get("op")
        try:
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise AgentError("EUNKNOWNOP", f"unknown op {op!r}")
            final = {"kind": protocol.KIND_RESULT, "value": handler(request, emit)}
        except AgentError as exc:
            final = {"kind": protocol.KIND_ERROR, "error": exc.code, "message": str(exc)}
        except OSError as exc:
            mapped = error_from_oserror(exc)
            final = {"kind": protocol.KIND_ERROR, "error": mapped.code, "message": str(mapped)}
        except ConnectionLost:
            return
        except Exception as exc:  # a bug: report it rather than leave the host waiting
            log(f"{op} failed: {exc!r}")
            final = {"kind": protocol.KIND_ERROR, "error": "EINTERNAL", "message": repr(exc)}
        try:
            emit(final)
        except ConnectionLost:
            return
        if op == "shutdown" and "value" in final:
            self.power_off()

    def exec_env(self, extra: dict[str, str]) -> dict[str, str]:
        with self.env_lock:
            return {**DEFAULT_ENV, **self.env_overrides, **extra}

    # ---- ops

    def op_ping(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{} -> {"uptime": seconds since boot, "pid", "agent_uptime", "workdir", "time_ns"}

        ``workdir`` (null when unset) is where exec and python start; the host
        resolves relative file paths against it."""
        return {
            "uptime": time.clock_gettime(time.CLOCK_BOOTTIME),
            "pid": os.getpid(),
            "agent_uptime": time.monotonic() - self.started,
            "workdir": self.workdir,
            "time_ns": time.time_ns(),  # the guest's clock, so the host can see drift
        }

    def op_exec(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"argv": [..]} | {"shell": str}, "env", "cwd", "timeout", "stdin" (b64),
        "output_limit" -> streamed stdout/stderr, then
        {"exit_code", "timed_out", "duration", "cpu_time", "truncated"}.

        exit_code is minus the signal number when a signal ended the process; a
        timeout kills the whole process group with SIGKILL, so it reports -9."""
        if "shell" in args and args["shell"] is not None:
            argv = ["/bin/sh", "-c", arg(args, "shell", str)]
        else:
            argv = arg(args, "argv", list)
            if not argv or not all(isinstance(item, str) for item in argv):
                raise AgentError("EINVAL", "argv must be a non-empty list of strings")
        env = self.exec_env(env_arg(args, "env"))
        cwd = arg(args, "cwd", str, self.workdir)
        timeout = arg(args, "timeout", (int, float), None)
        stdin_data = b64_arg(args, "stdin", b"") if args.get("stdin") is not None else None
        sink = OutputSink(emit, arg(args, "output_limit", int, DEFAULT_OUTPUT_LIMIT))

        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, killed as one on timeout
            )
        except FileNotFoundError as exc:
            # Popen reports a missing cwd and a missing program alike.
            if cwd is not None and not os.path.isdir(cwd):
                raise AgentError("ENOENT", f"working directory {cwd} does not exist") from None
            raise AgentError("ENOENT", f"command not found: {argv[0]}") from exc
        if stdin_data is not None:
            threading.Thread(target=feed_stdin, args=(process.stdin, stdin_data), daemon=True).start()

        status, rusage, timed_out = self._collect(process, sink, deadline)
        return {
            "exit_code": -signal.SIGKILL if timed_out else exit_code_of(status),
            "timed_out": timed_out,
            "duration": time.monotonic() - started,
            "cpu_time": rusage.ru_utime + rusage.ru_stime,
            "truncated": sink.truncated,
        }

    def _collect(self, process: subprocess.Popen, sink: OutputSink, deadline: float | None):
        """Stream output until the process exits; returns (wait status, rusage, timed_out)."""
        kinds = {process.stdout: protocol.KIND_STDOUT, process.stderr: protocol.KIND_STDERR}
        waited: tuple[int, object] | None = None
        timed_out = False
        grace_deadline = 0.0
        # A pidfd turns readable when the process exits: the loop wakes at its
        # exit instead of polling (the pipes often close a moment before it is
        # reapable, and a 10 ms poll then cost 10 ms per exec).
        pidfd = open_pidfd(process.pid)
        with selectors.DefaultSelector() as selector:
            for pipe in kinds:
                selector.register(pipe, selectors.EVENT_READ)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ)
            while any(key.fd != pidfd for key in selector.get_map().values()) or (
                waited is None and pidfd is not None
            ):
                now = time.monotonic()
                if waited is None and deadline is not None and now >= deadline:
                    os.killpg(process.pid, signal.SIGKILL)
                    timed_out = True
                    deadline = None
                if waited is not None and now >= grace_deadline:
                    # Background children still hold the pipes: stop waiting for them.
                    pipes = [key.fileobj for key in selector.get_map().values()]
                    for pipe in pipes:
                        selector.unregister(pipe)
                    discard_until_eof(pipes)
                    break
                if waited is not None:
                    timeout: float | None = grace_deadline - now
                elif pidfd is not None:
                    timeout = None  # the pidfd wakes us at the exit
                else:
                    # Wake up now and then to notice the exit even if a
                    # background child keeps the pipes open.
                    timeout = 0.1
                if waited is None and deadline is not None:
                    remaining = max(0.0, deadline - now)
                    timeout = remaining if timeout is None else min(timeout, remaining)
                for key, _ in selector.select(timeout):
                    if key.fd == pidfd:
                        continue  # reaped below
                    data = os.read(key.fd, protocol.CHUNK_BYTES)
                    if data:
                        # Past the limit we keep reading (so the process never
                        # blocks on a full pipe) but drop the data.
                        sink.write(kinds[key.fileobj], data)
                    else:
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                if waited is None:
                    pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
                    if pid:
                        waited = (status, rusage)
                        grace_deadline = time.monotonic() + BACKGROUND_OUTPUT_GRACE
                        if pidfd is not None:
                            selector.unregister(pidfd)
        if pidfd is not None:
            os.close(pidfd)
        if waited is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            waited = self._wait(process, remaining)
            if waited is None:
                os.killpg(process.pid, signal.SIGKILL)
                timed_out = True
                waited = self._wait(process, None)
        status, rusage = waited
        # Reaped by wait4 above: Popen must never wait for (a reused) pid again.
        process.returncode = exit_code_of(status)
        return status, rusage, timed_out

    @staticmethod
    def _wait(process: subprocess.Popen, timeout: float | None):
        """wait4 with a timeout; None when it ran out."""
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG if end is not None else 0)
            if pid:
                return status, rusage
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(0.01)

    def op_write_file(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"path", "data" (b64), "offset"=0, "truncate"=offset==0, "mode", "mkdirs"=false}
        -> {"size": file size after the write}"""
        path = arg(args, "path", str)
        data = b64_arg(args, "data", b"")
        offset = arg(args, "offset", int, 0)
        truncate = arg(args, "truncate", bool, offset == 0)
        mode = arg(args, "mode", int, None)
        if offset < 0:
            raise AgentError("EINVAL", "offset must be >= 0")
        if arg(args, "mkdirs", bool, False):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.isdir(path):
            raise AgentError("EISDIR", f"{path} is a directory")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644 if mode is None else mode)
        try:
            if truncate:
                os.ftruncate(fd, offset)
            view = memoryview(data)
            position = offset
            while view:
                written = os.pwrite(fd, view, position)
                view = view[written:]
                position += written
            if mode is not None:
                os.fchmod(fd, mode)  # the create mode above is filtered by the umask
            return {"size": os.fstat(fd).st_size}
        finally:
            os.close(fd)

    def op_read_file(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"path", "offset"=0, "length"=CHUNK_BYTES (at most 8 MiB)} -> {"data", "eof", "size"}"""
        path = arg(args, "path", str)
        offset = arg(args, "offset", int, 0)
        length = arg(args, "length", int, protocol.CHUNK_BYTES)
        if offset < 0 or length < 0:
            raise AgentError("EINVAL", "offset and length must be >= 0")
        if os.path.isdir(path):
            raise AgentError("EISDIR", f"{path} is a directory")
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            data = os.pread(file.fileno(), min(length, MAX_READ_BYTES), offset)
        return {"data": b64(data), "eof": offset + len(data) >= size, "size": size}

    def op_stat(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"path"} -> {"path", "size", "is_dir", "mode" (permission bits), "mtime"}"""
        path = arg(args, "path", str)
        info = os.stat(path)
        return {
            "path": path,
            "size": info.st_size,
            "is_dir": stat.S_ISDIR(info.st_mode),
            "mode": stat.S_IMODE(info.st_mode),
            "mtime": info.st_mtime,
        }

    def op_list(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"path", "recursive"=false, "limit"=1000} -> {"entries": [...], "truncated"}

        A recursive listing goes breadth-first (the limit keeps the shallowest
        entries) and does not follow symlinks; the result is sorted by path."""
        root = arg(args, "path", str)
        recursive = arg(args, "recursive", bool, False)
        limit = arg(args, "limit", int, 1000)
        if not os.path.isdir(root):
            os.stat(root)  # ENOENT when it is missing
            raise AgentError("ENOTDIR", f"{root} is not a directory")
        entries: list[dict] = []
        pending = [root]
        while pending and len(entries) <= limit:
            directory = pending.pop(0)
            try:
                with os.scandir(directory) as iterator:
                    children = sorted(iterator, key=lambda entry: entry.name)
            except OSError:
                if directory == root:
                    raise
                continue  # an unreadable subdirectory does not spoil the listing
            for entry in children:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(info.st_mode)
                entries.append(
                    {"path": entry.path, "size": info.st_size, "is_dir": is_dir, "mtime": info.st_mtime}
                )
                if recursive and is_dir:
                    pending.append(entry.path)
        kept = sorted(entries[:limit], key=lambda entry: entry["path"])
        return {"entries": kept, "truncated": len(entries) > limit}

    def op_set_env(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"env": {name: value}} -> {}: every later exec and python session sees it."""
        env = env_arg(args, "env")
        with self.env_lock:
            self.env_overrides.update(env)
            merged = dict(self.env_overrides)
        try:
            write_atomically(
                os.path.join(self.etc_dir, "environment"),
                "".join(f"{name}={quote_environment_value(value)}\n" for name, value in merged.items()),
            )
        except OSError as exc:  # best effort: the agent's own env already has it
            log(f"could not write /etc/environment: {exc}")
        return {}

    def op_post_restore(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"seed" (b64, >= 32 bytes), "time_ns", "hostname"} -> {}

        After a snapshot restore: fresh kernel entropy, the host's time, a new
        identity, and reseeded random state here and in every python session."""
        seed = b64_arg(args, "seed")
        if len(seed) < 32:
            raise AgentError("EINVAL", "seed must be at least 32 bytes")
        time_ns = arg(args, "time_ns", int)
        hostname = arg(args, "hostname", str)
        if not hostname or len(hostname) > 64 or "/" in hostname or "\0" in hostname:
            raise AgentError("EINVAL", f"bad hostname {hostname!r}")
        credit_entropy(seed)
        if self.system:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
            socket.sethostname(hostname)
        write_atomically(os.path.join(self.etc_dir, "hostname"), hostname + "\n")
        random.seed()
        with self.sessions_lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            # A session busy with a cell is skipped rather than waited for.
            if session.lock.acquire(blocking=False):
                try:
                    session.run(RESEED_SOURCE, OutputSink(lambda frame: None, 0), time.monotonic() + 5)
                finally:
                    session.lock.release()
        return {}

    def op_set_clock(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"time_ns"} -> {"previous_ns": the clock just before}: the host's time.

        A warm pool VM got its identity (``post_restore``) when the pool filled;
        when it is claimed, possibly much later, only its clock is set again."""
        time_ns = arg(args, "time_ns", int)
        previous = time.time_ns()
        if self.system:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
        return {"previous_ns": previous}

    def op_python_exec(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{"session", "code", "timeout"} -> streamed output, then
        {"exit_code": 0|1, "timed_out", "duration", "cpu_time", "truncated"}.

        One interpreter per session keeps its globals between calls. A timeout
        (or the interpreter exiting) loses the session's state; the next call
        starts a fresh interpreter."""
        name = arg(args, "session", str)
        code = arg(args, "code", str)
        timeout = arg(args, "timeout", (int, float), None)
        sink = OutputSink(emit, arg(args, "output_limit", int, DEFAULT_OUTPUT_LIMIT))
        with self.sessions_lock:
            session = self.sessions.get(name)
            if session is None:
                session = PythonSession(self.exec_env({}), self.workdir)
                self.sessions[name] = session
        started = time.monotonic()
        with session.lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            outcome, cpu_time = session.run(code, sink, deadline)
            if outcome in ("timeout", "died"):
                with self.sessions_lock:
                    if self.sessions.get(name) is session:
                        del self.sessions[name]
                session.kill()
                reason = f"timed out after {timeout} s" if outcome == "timeout" else "exited"
                message = f"kiln: python session {name!r} {reason}; its state was lost\n"
                sink.write(protocol.KIND_STDERR, message.encode())
        return {
            "exit_code": 0 if outcome == "ok" else 1,
            "timed_out": outcome == "timeout",
            "duration": time.monotonic() - started,
            "cpu_time": cpu_time,
            "truncated": sink.truncated,
        }

    def op_shutdown(self, args: dict, emit: Callable[[dict], None]) -> dict:
        """{} -> {}, then the VM powers off (on a developer host: the agent exits)."""
        return {}

    def power_off(self) -> None:
        os.sync()
        if not self.system:
            log("shutdown requested; exiting (not powering off a developer host)")
            os._exit(0)
        import ctypes  # here, not at the top: it is slow to import under TCG

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
        log(f"reboot(POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")
        subprocess.run(["poweroff", "-f"], check=False)


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits); None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def feed_stdin(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
    except BrokenPipeError:
        pass  # the command did not read all of it
    finally:
        try:
            pipe.close()
        except BrokenPipeError:
            pass


def quote_environment_value(value: str) -> str:
    """A value for /etc/environment: double-quoted, escaped so that a POSIX shell
    sourcing the file (``set -a; . /etc/environment``) gets the value back as it
    was (every character a double-quoted string treats specially: \\ " $ `)."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    )
    return '"' + escaped.replace("\n", "\\n") + '"'


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.kiln-tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def credit_entropy(seed: bytes) -> None:
    """Mix the host's seed into the kernel pool, crediting it when we may."""
    with open("/dev/random", "wb", buffering=0) as pool:
        try:
            request = struct.pack("ii", len(seed) * 8, len(seed)) + seed
            fcntl.ioctl(pool.fileno(), RNDADDENTROPY, request)
        except OSError:
            # not CAP_SYS_ADMIN: mixing it in uncredited is still worth it
            pool.write(seed)
        # The kernel reseeds its generator from the pool only every so often, so
        # until then VMs restored from one snapshot would read the same bytes
        # from /dev/urandom (seen under Linux 6.1): reseed it now.
        try:
            fcntl.ioctl(pool.fileno(), RNDRESEEDCRNG)
        except OSError:
            pass  # not CAP_SYS_ADMIN (a developer host): nothing more to do


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", help="listen on this unix socket instead of the virtio port")
    where.add_argument("--fd", type=int, help="serve this inherited, connected socket fd")
    parser.add_argument("--workdir", help="default working directory of exec and python")
    parser.add_argument("--etc-dir", default="/etc", help="where environment and hostname are written")
    parser.add_argument(
        "--no-system",
        action="store_true",
        help="never set the clock or hostname, nor power off (for running on a host)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    agent = Agent(workdir=options.workdir, etc_dir=options.etc_dir, system=not options.no_system)
    if options.fd is not None:
        transport: Transport = InheritedSocket(options.fd)
    elif options.socket:
        transport = ListeningSocket(options.socket)
    else:
        transport = VirtioPort()
    log(f"serving (pid {os.getpid()}, uptime {time.clock_gettime(time.CLOCK_BOOTTIME):.2f})")
    agent.serve(transport)


if __name__ == "__main__":
    main()
