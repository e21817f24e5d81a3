"""Terminals: processes on pseudo-terminals that outlive host connections
(pty_open, pty_attach, pty_detach, pty_write, pty_resize, pty_kill, pty_list)."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from .args import arg, b64_arg, env_arg
from .errors import AgentError
from .exec import exit_code_of
from .wire import Emit, Handler, b64, protocol

# Output kept per terminal: replayed to whoever attaches, and the slack a slow
# host has before it misses output (it then skips ahead; the shell never blocks).
PTY_SCROLLBACK_BYTES = 256 * 1024
PTY_MAX_SIZE = 1000  # columns or rows
PTY_KILL_GRACE_SECONDS = 1.0
MAX_ENDED_TERMINALS = 32  # ended terminals kept for their exit code


def set_window_size(fd: int, cols: int, rows: int) -> None:
    import termios  # here, not at the top: only PTY users pay for it

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def take_controlling_terminal() -> None:
    """Runs in the child between fork and exec (after setsid): make stdin, the
    PTY's slave side, the session's controlling terminal, so job control and
    ^C reach the shell's foreground job."""
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def terminal_size_arg(args: dict[str, Any], name: str, default: int) -> int:
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
                # preexec_fn: only a call between fork and exec can take the terminal.
                start_new_session=True, preexec_fn=take_controlling_terminal,  # noqa: PLW1509
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

    def info(self) -> dict[str, Any]:
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

    def follow(self, attach_id: str, replay: bool, emit: Emit) -> dict[str, Any]:
        """Emit output as it comes until the process ends or the host detaches."""
        with self.changed:
            position = self.produced - (len(self.scrollback) if replay else 0)
        while True:
            with self.changed:
                self.changed.wait_for(
                    # Called within this iteration only: the current position is meant.
                    lambda: self.produced > position or not self.alive or attach_id in self.detached  # noqa: B023
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

    def handlers(self) -> dict[str, Handler]:
        return {
            "pty_open": self.op_pty_open, "pty_attach": self.op_pty_attach,
            "pty_detach": self.op_pty_detach, "pty_write": self.op_pty_write,
            "pty_resize": self.op_pty_resize, "pty_kill": self.op_pty_kill,
            "pty_list": self.op_pty_list,
        }

    def get(self, args: dict[str, Any]) -> Terminal:
        pty_id = arg(args, "pty_id", str)
        with self.lock:
            terminal = self.terminals.get(pty_id)
        if terminal is None:
            raise AgentError("ENOENT", f"no terminal {pty_id!r}")
        return terminal

    def op_pty_open(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
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

    def op_pty_attach(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"pty_id", "attach_id", "replay"=true} -> output as stdout events until the
        process ends or pty_detach names this attach_id; then {"exit_code", "detached"}.
        With replay, the scrollback comes first."""
        terminal = self.get(args)
        return terminal.follow(arg(args, "attach_id", str), arg(args, "replay", bool, True), emit)

    def op_pty_detach(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"pty_id", "attach_id"} -> {}: ends that pty_attach request."""
        self.get(args).detach(arg(args, "attach_id", str))
        return {}

    def op_pty_write(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"pty_id", "data" (b64)} -> {"written"}: keyboard input."""
        data = b64_arg(args, "data")
        self.get(args).write(data)
        return {"written": len(data)}

    def op_pty_resize(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"pty_id", "cols", "rows"} -> the terminal's info."""
        terminal = self.get(args)
        terminal.resize(terminal_size_arg(args, "cols", terminal.cols),
                        terminal_size_arg(args, "rows", terminal.rows))
        return terminal.info()

    def op_pty_kill(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"pty_id"} -> the terminal's last info; it is then forgotten."""
        terminal = self.get(args)
        terminal.kill()
        with self.lock:
            if self.terminals.get(terminal.pty_id) is terminal:
                del self.terminals[terminal.pty_id]
        return terminal.info()

    def op_pty_list(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{} -> {"ptys": [info, ...]}, oldest first; ended ones too."""
        with self.lock:
            terminals = sorted(self.terminals.values(), key=lambda t: t.created_at)
        return {"ptys": [terminal.info() for terminal in terminals]}

