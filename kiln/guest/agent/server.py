"""The agent itself: reads requests from a transport, runs each in its own
thread (a slow ``exec`` never delays a ``ping``), and routes it to the handler
of its op; the handlers live in one module per concern."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import files, fsops
from .config import AgentConfig
from .env import Environment
from .errors import AgentError, ConnectionLost, error_from_oserror
from .exec import Commands
from .mounts import Mounts
from .net import Network
from .pty import Terminals
from .python_session import PythonSessions
from .streams import Streams
from .system import System
from .transport import Connection, Transport
from .trust import Trust
from .wire import Emit, Handler, log, protocol


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.env = Environment(config.etc_dir)
        self.sessions = PythonSessions(self.env.for_exec, config.workdir)
        self.system = System(config, self.sessions)
        self.streams = Streams()
        self.handlers: dict[str, Handler] = {"ping": self.op_ping}
        for group in (
            files.handlers(),
            fsops.handlers(),
            self.env.handlers(),
            Commands(self.env.for_exec, config.workdir, self.streams).handlers(),
            self.streams.handlers(),
            self.sessions.handlers(),
            self.system.handlers(),
            Terminals(self.env.for_exec, config.workdir).handlers(),
            Network(config, self.system).handlers(),
            Mounts(config, self.system).handlers(),
            Trust(config, self.env).handlers(),
        ):
            twice = self.handlers.keys() & group.keys()
            if twice:
                raise RuntimeError(f"ops registered twice: {sorted(twice)}")
            self.handlers.update(group)

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

    def handle(self, request: dict[str, Any], connection: Connection) -> None:
        request_id = request["id"]

        def emit(frame: dict[str, Any]) -> None:
            connection.send({"id": request_id, **frame})

        op = request.get("op")
        try:
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise AgentError("EUNKNOWNOP", f"unknown op {op!r}")
            final: dict[str, Any] = {"kind": protocol.KIND_RESULT, "value": handler(request, emit)}
        except AgentError as exc:
            final = {"kind": protocol.KIND_ERROR, "error": exc.code, "message": str(exc)}
        except OSError as exc:
            mapped = error_from_oserror(exc)
            final = {"kind": protocol.KIND_ERROR, "error": mapped.code, "message": str(mapped)}
        except ConnectionLost:
            return
        except Exception as exc:  # noqa: BLE001 - a bug: report it rather than leave the host waiting
            log(f"{op} failed: {exc!r}")
            final = {"kind": protocol.KIND_ERROR, "error": "EINTERNAL", "message": repr(exc)}
        try:
            emit(final)
        except ConnectionLost:
            return
        if op == "shutdown" and "value" in final:
            self.system.power_off()

    # ---- ops

    def op_ping(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{} -> {"uptime": seconds since boot, "pid", "agent_uptime", "workdir", "time_ns"}

        ``workdir`` (null when unset) is where exec and python start; the host
        resolves relative file paths against it."""
        return {
            "uptime": time.clock_gettime(time.CLOCK_BOOTTIME),
            "pid": os.getpid(),
            "agent_uptime": time.monotonic() - self.started,
            "workdir": self.config.workdir,
            "time_ns": time.time_ns(),  # the guest's clock, so the host can see drift
        }
