"""Persistent Python: one child interpreter per session keeps its globals from
one ``python_exec`` to the next."""

from __future__ import annotations

import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .args import arg
from .exec import DEFAULT_OUTPUT_LIMIT, OutputSink
from .wire import Emit, Handler, protocol

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
        if self.process.stdout is None or self.process.stderr is None:  # never: both are pipes
            raise RuntimeError("a python session without output pipes")
        self.stdout, self.stderr = self.process.stdout, self.process.stderr
        self._status_buffer = b""

    def run(self, source: str, sink: OutputSink, deadline: float | None) -> tuple[str, float]:
        """Run one cell: returns ("ok" | "failed" | "timeout" | "died", cpu_time)."""
        encoded = source.encode("utf-8")
        try:
            os.write(self._code_write, struct.pack(">I", len(encoded)))
            self._write_all(encoded)
        except BrokenPipeError:
            return "died", 0.0
        streams = {self.stdout.fileno(): protocol.KIND_STDOUT, self.stderr.fileno(): protocol.KIND_STDERR}
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
        self.stdout.close()
        self.stderr.close()



class PythonSessions:
    """The python_exec op and the sessions it keeps, by name."""

    def __init__(self, env: Callable[[dict[str, str]], dict[str, str]], workdir: str | None) -> None:
        self.exec_env = env
        self.workdir = workdir
        self.sessions: dict[str, PythonSession] = {}
        self.sessions_lock = threading.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"python_exec": self.op_python_exec}

    def reseed_idle(self) -> None:
        """After a restore: new random state in every session not busy with a cell
        (a busy one is skipped rather than waited for)."""
        with self.sessions_lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            if session.lock.acquire(blocking=False):
                try:
                    session.run(RESEED_SOURCE, OutputSink(lambda frame: None, 0), time.monotonic() + 5)
                finally:
                    session.lock.release()

    def op_python_exec(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
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

