"""The exec op: a command in its own session, its output streamed as events
(``OutputSink``), its exit noticed through a pidfd rather than by polling."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any, cast

from .args import arg, b64_arg, env_arg
from .errors import AgentError
from .streams import Stream, Streams
from .wire import Emit, Handler, b64, protocol

DEFAULT_OUTPUT_LIMIT = 10 * 1024 * 1024
# A streamed command's output is held back by the host's credit, not cut.
STREAMED_OUTPUT_LIMIT = 1 << 62
# A command's output pipes stay open while its background children live; after
# the command itself exits we keep collecting for this long, then let it go.
BACKGROUND_OUTPUT_GRACE = 1.0

Waited = tuple[int, Any]  # (wait status, resource usage)


class OutputSink:
    """Streams a request's output as events, up to a byte limit shared by both streams;
    with a ``Stream``, each chunk waits for the host's credit."""

    def __init__(self, emit: Emit, limit: int, stream: Stream | None = None) -> None:
        self._emit = emit
        self.remaining = limit
        self.truncated = False
        self._stream = stream

    def started(self, pid: int) -> None:
        """A streamed command runs: its stream takes stream_write from now on."""
        self._emit({"kind": "started", "pid": pid})

    def write(self, kind: str, data: bytes) -> None:
        if len(data) > self.remaining:
            data = data[: self.remaining]
            self.truncated = True
        if not data:
            return
        self.remaining -= len(data)
        if self._stream is not None:
            self._stream.send(self._emit, kind, data)
            return
        for start in range(0, len(data), protocol.CHUNK_BYTES):
            self._emit({"kind": kind, "data": b64(data[start : start + protocol.CHUNK_BYTES])})


def discard_until_eof(pipes: list[Any]) -> None:
    """Drain pipes in the background so writers never get SIGPIPE, then close them."""

    def drain() -> None:
        with selectors.DefaultSelector() as selector:
            for pipe in pipes:
                selector.register(pipe, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    if not os.read(key.fd, 65536):
                        selector.unregister(key.fileobj)
                        cast(IO[bytes], key.fileobj).close()

    threading.Thread(target=drain, name="discard-output", daemon=True).start()


def exit_code_of(status: int) -> int:
    """A wait status as a number: the exit code, or minus the signal that killed it."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)

class Commands:
    """The exec op; ``env`` gives each command its environment, ``streams`` holds
    the commands whose stdin the host feeds as it goes."""

    def __init__(
        self, env: Callable[[dict[str, str]], dict[str, str]], workdir: str | None, streams: Streams | None = None
    ) -> None:
        self.exec_env = env
        self.workdir = workdir
        self.streams = streams or Streams()

    def handlers(self) -> dict[str, Handler]:
        return {"exec": self.op_exec}

    def op_exec(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"argv": [..]} | {"shell": str}, "env", "cwd", "timeout", "stdin" (b64),
        "output_limit", "stream_id", "window" -> streamed stdout/stderr, then
        {"exit_code", "timed_out", "duration", "cpu_time", "truncated"}.

        exit_code is minus the signal number when a signal ended the process; a
        timeout kills the whole process group with SIGKILL, so it reports -9.
        With ``stream_id`` (no ``stdin``): a "started" event (``pid``) comes
        first, then stdin is fed by stream_write as it comes, output waits for
        the host's stream_ack past ``window`` bytes and is never cut, and
        stream_close kills the process group."""
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
        if args.get("stream_id") is not None:
            if stdin_data is not None:
                raise AgentError("EINVAL", "a streamed command takes its stdin from stream_write")
            stream = self.streams.register(args)
            try:
                return self._run(argv, env, cwd, timeout, stream, OutputSink(emit, STREAMED_OUTPUT_LIMIT, stream))
            finally:
                self.streams.forget(stream)
        sink = OutputSink(emit, arg(args, "output_limit", int, DEFAULT_OUTPUT_LIMIT))
        return self._run(argv, env, cwd, timeout, stdin_data, sink)

    def _run(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        timeout: float | None,
        stdin: bytes | Stream | None,
        sink: OutputSink,
    ) -> dict[str, Any]:
        stdin_data = stdin if isinstance(stdin, bytes) else None

        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
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
        if isinstance(stdin, Stream):
            attach_stdin(stdin, process)
            sink.started(process.pid)
        try:
            status, rusage, timed_out = self._collect(process, sink, deadline)
        finally:
            if isinstance(stdin, Stream):
                detach_stdin(stdin, process)
        return {
            "exit_code": -signal.SIGKILL if timed_out else exit_code_of(status),
            "timed_out": timed_out,
            "duration": time.monotonic() - started,
            "cpu_time": rusage.ru_utime + rusage.ru_stime,
            "truncated": sink.truncated,
        }

    def _collect(
        self, process: subprocess.Popen, sink: OutputSink, deadline: float | None
    ) -> tuple[int, Any, bool]:
        """Stream output until the process exits; returns (wait status, rusage, timed_out)."""
        kinds: dict[Any, str] = {process.stdout: protocol.KIND_STDOUT, process.stderr: protocol.KIND_STDERR}
        waited: Waited | None = None
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
                    held = [key.fileobj for key in selector.get_map().values()]
                    for pipe in held:
                        selector.unregister(pipe)
                    discard_until_eof(held)
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
                        cast(IO[bytes], key.fileobj).close()
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
            left = None if deadline is None else deadline - time.monotonic()
            waited = self._wait(process, left)
            if waited is None:
                os.killpg(process.pid, signal.SIGKILL)
                timed_out = True
                waited = self._wait(process, None)
                assert waited is not None  # without a timeout it waits for the exit
        status, rusage = waited
        # Reaped by wait4 above: Popen must never wait for (a reused) pid again.
        process.returncode = exit_code_of(status)
        return status, rusage, timed_out

    @staticmethod
    def _wait(process: subprocess.Popen, timeout: float | None) -> Waited | None:
        """wait4 with a timeout; None when it ran out."""
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG if end is not None else 0)
            if pid:
                return status, rusage
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(0.01)

def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits); None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def attach_stdin(stream: Stream, process: subprocess.Popen) -> None:
    """stream_write feeds the command's stdin; stream_close kills its process group."""
    pipe = process.stdin
    assert pipe is not None
    stream.input_fd = pipe.fileno()

    def eof() -> None:
        stream.input_fd = None
        try:
            pipe.close()
        except OSError:
            pass

    def kill() -> None:
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    stream.on_eof = eof
    stream.on_close = kill


def detach_stdin(stream: Stream, process: subprocess.Popen) -> None:
    stream.on_close = lambda: None
    with stream.write_lock:
        stream.on_eof()


def feed_stdin(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except BrokenPipeError:
        pass  # the command did not read all of it
    finally:
        try:
            pipe.close()
        except BrokenPipeError:
            pass


