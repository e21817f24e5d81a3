"""The server's side of the SSH gateway's channel to guests (``sshd/server.sock``).

The gateway is a process of its own and the agent channel of a VM has one
holder, this server; so the gateway asks the server to pass agent requests on.
One unix connection per SSH connection, speaking the agent's own frames
(``kiln.guest.protocol``) with ids of the gateway's choosing:

1. ``{"id", "op": "open", "vm_id", "owner_id"}`` binds the connection to a VM
   of that owner: a VM with ``auto_resume`` that is suspended is resumed first
   (``VmService.running_machine``, the wake path the share router uses). The
   result names the VM and the agent's working directory.
2. Then any op of ``RELAYED_OPS``: its frames come back as the agent sends
   them (events, then one final frame), with the request's id. A long op (a
   terminal's output, a streamed command, a connection into the guest) has no
   deadline; the rest the agent deadline.
3. ``{"id", "op": "cancel", "request": n}`` stops passing request ``n`` on.

When the connection ends (the SSH client left, or the gateway died, even by
``kill -9``) everything it started in the guest goes: streamed commands and
connections are closed (``stream_close``: the command's process group is
killed), attaches detached, terminals it opened killed. Nothing is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from kiln.guest import protocol
from kiln.runtime.agent_client import NO_DEADLINE
from kiln.runtime.driver import Machine
from kiln.runtime.errors import AgentError, RuntimeFailure
from kiln.services.errors import NotFound, ServiceError
from kiln.services.vms import VmService, describe

log = logging.getLogger(__name__)

RELAYED_OPS = frozenset(
    {
        "ping", "exec", "stream_write", "stream_ack", "stream_close", "tcp_connect",
        "pty_open", "pty_attach", "pty_detach", "pty_write", "pty_resize", "pty_kill",
        "read_file", "write_file", "stat", "list", "list_dir", "remove", "mkdir", "rmdir",
        "rename", "set_attrs", "readlink", "symlink", "realpath",
    }
)  # fmt: skip
# Ops that last as long as what they follow (stream_write: a process that does not read yet).
LONG_OPS = frozenset({"pty_attach", "tcp_connect", "stream_write"})
CLEANUP_SECONDS = 5.0
READ_BYTES = 256 * 1024


@dataclass(eq=False)
class _Link:
    """One gateway connection: its VM, requests in flight, what it made in the guest."""

    writer: asyncio.StreamWriter
    machine: Machine | None = None
    vm_id: str = ""
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)
    attaches: set[tuple[str, str]] = field(default_factory=set)
    ptys: set[str] = field(default_factory=set)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.write_lock:
            self.writer.write(protocol.encode_frame(frame))
            await self.writer.drain()


def _error(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "kind": protocol.KIND_ERROR, "error": code, "message": message}


class GuestRelay:
    """Serves the gateway's connections (``serve`` is an asyncio unix server's callback)."""

    def __init__(self, vms: VmService) -> None:
        self._vms = vms
        self.links: set[_Link] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self.links.add(link)
        decoder = protocol.FrameDecoder()
        try:
            while data := await reader.read(READ_BYTES):
                for body in decoder.feed(data):
                    await self._dispatch(link, protocol.decode_body(body))
        except (ConnectionError, ValueError, protocol.FrameError) as error:
            log.info("ssh relay connection ended: %s", describe(error))
        finally:
            await self._clean_up(link)
            self.links.discard(link)
            writer.close()

    async def _dispatch(self, link: _Link, request: dict[str, Any]) -> None:
        request_id = request.pop("id", None)
        op = request.pop("op", None)
        if not isinstance(request_id, int) or not isinstance(op, str):
            return
        if op == "open":
            await self._open(link, request_id, request)
        elif op == "cancel":
            task = link.tasks.get(request.get("request"))  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif link.machine is None:
            await link.send(_error(request_id, "ENOTOPEN", "open a VM first"))
        elif op not in RELAYED_OPS:
            await link.send(_error(request_id, "EUNKNOWNOP", f"op {op!r} is not relayed"))
        else:
            self._vms.activity.touch(link.vm_id)
            link.tasks[request_id] = asyncio.create_task(self._relay(link, request_id, op, request))

    async def _open(self, link: _Link, request_id: int, request: dict[str, Any]) -> None:
        vm_id, owner_id = request.get("vm_id"), request.get("owner_id")
        if link.machine is not None or not isinstance(vm_id, str) or not isinstance(owner_id, int):
            await link.send(_error(request_id, "EINVAL", "open names a vm_id and an owner_id, once"))
            return
        try:
            vm = await self._vms.get(owner_id, vm_id)
            machine = await self._vms.running_machine(owner_id, vm_id, loaded=vm)
            ping = await machine.agent.call("ping")
        except NotFound as error:
            await link.send(_error(request_id, "ENOENT", str(error)))
            return
        except (ServiceError, RuntimeFailure) as error:
            await link.send(_error(request_id, "EUNAVAILABLE", describe(error)))
            return
        link.machine, link.vm_id = machine, vm_id
        value = {"vm_id": vm_id, "session_id": vm.session_id, "workdir": ping.get("workdir")}
        await link.send({"id": request_id, "kind": protocol.KIND_RESULT, "value": value})

    async def _relay(self, link: _Link, request_id: int, op: str, args: dict[str, Any]) -> None:
        assert link.machine is not None
        streamed = op == "tcp_connect" or (op == "exec" and args.get("stream_id") is not None)
        timeout = NO_DEADLINE if op in LONG_OPS or streamed else None
        stream_id = str(args.get("stream_id")) if streamed else None
        attach = (str(args.get("pty_id")), str(args.get("attach_id"))) if op == "pty_attach" else None
        if stream_id is not None:
            link.streams.add(stream_id)
        if attach is not None:
            link.attaches.add(attach)
        try:
            async for frame in link.machine.agent.stream(op, timeout=timeout, **args):
                if op == "pty_open" and frame.get("kind") == protocol.KIND_RESULT:
                    link.ptys.add(str((frame.get("value") or {}).get("pty_id")))
                await link.send({**frame, "id": request_id})
            if op == "pty_kill":
                link.ptys.discard(str(args.get("pty_id")))
        except AgentError as error:
            await self._send_quietly(link, _error(request_id, error.code, error.message))
        except RuntimeFailure as error:
            await self._send_quietly(link, _error(request_id, "EUNAVAILABLE", describe(error)))
        except asyncio.CancelledError:
            pass
        finally:
            link.tasks.pop(request_id, None)
            if stream_id is not None:
                link.streams.discard(stream_id)
            if attach is not None:
                link.attaches.discard(attach)

    async def _send_quietly(self, link: _Link, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await link.send(frame)

    async def _clean_up(self, link: _Link) -> None:
        """The gateway's connection ended: end what it started in the guest."""
        machine = link.machine
        calls: list[tuple[str, dict[str, Any]]] = [("stream_close", {"stream_id": s}) for s in link.streams]
        calls += [("pty_detach", {"pty_id": p, "attach_id": a}) for p, a in link.attaches]
        calls += [("pty_kill", {"pty_id": p}) for p in link.ptys]
        for task in list(link.tasks.values()):
            task.cancel()
        if machine is None or not calls:
            return
        log.info("vm %s: an ssh connection ended; closing %d things it left in the guest", link.vm_id, len(calls))
        for op, args in calls:
            with contextlib.suppress(RuntimeFailure):
                await machine.agent.call(op, timeout=CLEANUP_SECONDS, **args)

    async def close(self) -> None:
        for link in list(self.links):
            link.writer.close()
