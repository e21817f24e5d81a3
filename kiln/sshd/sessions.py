"""SSH sessions in a VM: a terminal (``ssh host``, ``ssh -t host cmd``) through the
agent's PTY ops, or a command without one (``ssh host -- cmd``, ``ssh -T host``)
through a streamed ``exec``.

- Terminal: ``pty_open`` at the client's size and TERM, ``pty_attach`` for the
  output, each keystroke ``pty_write``, each window change ``pty_resize``; the
  shell's exit status (or signal) is the session's. The client leaving kills
  the terminal.
- Command: ``exec`` with a stream (``/bin/bash -c CMD``, ``/bin/sh`` where the
  image has no bash; no command: a login shell reading stdin). stdin is
  streamed in as it comes (EOF included), stdout and stderr come back apart,
  each acknowledged once the SSH channel took it (so a slow client holds the
  command back, never the gateway's memory); the exit status or signal is the
  session's. The client leaving kills the command's process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from typing import Any

import asyncssh

from kiln.guest import protocol
from kiln.sshd.relay import GuestError, GuestLink, b64, unb64

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# Environment a client may pass (OpenSSH's clients send LANG and LC_* with SendEnv).
ACCEPTED_ENV_PREFIXES = ("LANG", "LC_")
MAX_ENV_ENTRIES = 64
OLD_AGENT = "this VM's guest agent is older than the gateway (no streams): rebuild its image and start a new VM"
# A killed terminal's output ends within this (SIGHUP, then SIGKILL after 1 s).
KILL_SECONDS = 5.0


def client_env(process: asyncssh.SSHServerProcess) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in list(process.env.items())[:MAX_ENV_ENTRIES]:
        if isinstance(name, str) and isinstance(value, str) and name.startswith(ACCEPTED_ENV_PREFIXES):
            if "\0" not in value and "=" not in name:
                env[name] = value
    return env


def finish(process: asyncssh.SSHServerProcess, exit_code: int | None) -> None:
    """End the session with the command's status: an exit code, or the signal that killed it."""
    if exit_code is None:
        process.exit(255)
    elif exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name.removeprefix("SIG")
        except ValueError:
            process.exit(255)
            return
        process.exit_with_signal(name)
    else:
        process.exit(exit_code)


def refuse(process: asyncssh.SSHServerProcess, message: str) -> None:
    with contextlib.suppress(Exception):
        process.stderr.write(f"kiln: {message}\r\n".encode())
    process.exit(255)


async def run_terminal(process: asyncssh.SSHServerProcess, link: GuestLink) -> None:
    cols, rows, _, _ = process.term_size
    env = {"TERM": process.term_type or "xterm", **client_env(process)}
    info = await link.call(
        "pty_open", cols=min(max(cols, 1), 1000) if cols else 80, rows=min(max(rows, 1), 1000) if rows else 24,
        command=process.command or None, env=env,
    )  # fmt: skip
    pty_id = str(info["pty_id"])
    exit_code: int | None = None

    async def output() -> None:
        nonlocal exit_code
        attach_id = secrets.token_hex(8)
        async for frame in link.stream("pty_attach", pty_id=pty_id, attach_id=attach_id, replay=True):
            if frame.get("kind") == protocol.KIND_STDOUT:
                process.stdout.write(unb64(frame))
                await process.stdout.drain()
            elif frame.get("kind") == protocol.KIND_RESULT:
                exit_code = (frame.get("value") or {}).get("exit_code")

    async def keyboard() -> None:
        while True:
            try:
                data = await process.stdin.read(CHUNK_BYTES)
            except asyncssh.TerminalSizeChanged as change:
                await link.call("pty_resize", pty_id=pty_id, cols=change.width or 80, rows=change.height or 24)
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            if not data:
                return
            await link.call("pty_write", pty_id=pty_id, data=b64(data))

    reader = asyncio.create_task(output())
    writer = asyncio.create_task(keyboard())
    try:
        # The session ends when the shell does; the client leaving (its input
        # ends) hangs the terminal up.
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        writer.cancel()
        with contextlib.suppress(GuestError):
            await link.call("pty_kill", pty_id=pty_id)
        if not reader.done():
            with contextlib.suppress(GuestError, asyncio.CancelledError, ConnectionError, TimeoutError):
                await asyncio.wait_for(reader, KILL_SECONDS)
    if not reader.cancelled() and reader.exception() is not None:
        raise reader.exception()  # type: ignore[misc]
    finish(process, exit_code)


async def run_command(process: asyncssh.SSHServerProcess, link: GuestLink) -> None:
    command = process.command
    env = client_env(process)
    for shell in ("/bin/bash", "/bin/sh"):
        argv = [shell, "-c", command] if command is not None else [shell, "-l"]
        try:
            await _stream_command(process, link, argv, env)
            return
        except _NoShell:
            continue
    refuse(process, "this VM has no /bin/sh")


class _NoShell(Exception):
    pass


async def _stream_command(
    process: asyncssh.SSHServerProcess, link: GuestLink, argv: list[str], env: dict[str, str]
) -> None:
    stream_id = "ssh-" + secrets.token_hex(8)
    frames = link.stream("exec", argv=argv, env=env, stream_id=stream_id).__aiter__()
    try:
        first = await frames.__anext__()
    except GuestError as error:
        if error.code == "ENOENT" and argv[0] in error.message:
            raise _NoShell from None
        raise
    if first.get("kind") != "started":
        with contextlib.suppress(GuestError):
            await link.call("stream_close", stream_id=stream_id)
        raise GuestError("EUNKNOWNOP", OLD_AGENT)
    stdin = asyncio.create_task(_feed_stdin(process, link, stream_id))
    closed = asyncio.create_task(process.channel.wait_closed())
    result: dict[str, Any] = {}

    async def pump() -> None:
        nonlocal result
        async for frame in frames:
            kind = frame.get("kind")
            if kind in (protocol.KIND_STDOUT, protocol.KIND_STDERR):
                data = unb64(frame)
                out = process.stdout if kind == protocol.KIND_STDOUT else process.stderr
                out.write(data)
                await out.drain()
                await link.call("stream_ack", stream_id=stream_id, bytes=len(data))
            elif kind == protocol.KIND_RESULT:
                result = frame.get("value") or {}

    output = asyncio.create_task(pump())
    try:
        done, _ = await asyncio.wait({output, closed}, return_when=asyncio.FIRST_COMPLETED)
        if output not in done:
            # The client went away: the command goes with it.
            with contextlib.suppress(GuestError):
                await link.call("stream_close", stream_id=stream_id)
            with contextlib.suppress(GuestError, asyncio.CancelledError, ConnectionError, BrokenPipeError):
                await output
            return
        output.result()  # its GuestError, if any
    finally:
        for task in (stdin, closed, output):
            task.cancel()
    finish(process, result.get("exit_code"))


async def _feed_stdin(process: asyncssh.SSHServerProcess, link: GuestLink, stream_id: str) -> None:
    """The client's stdin into the command, EOF included; stops when the command
    takes no more (it exited, or closed its stdin)."""
    try:
        while True:
            try:
                data = await process.stdin.read(CHUNK_BYTES)
            except (asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged):
                continue
            if not data:
                await link.call("stream_write", stream_id=stream_id, eof=True)
                return
            await link.call("stream_write", stream_id=stream_id, data=b64(data))
    except GuestError as error:
        if error.code not in ("EPIPE", "ENOENT"):
            log.info("stdin of %s: %s", stream_id, error)
