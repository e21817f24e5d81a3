"""Pseudo-terminals in a VM: interactive shells for people and agents.

The guest agent owns the terminals (``pty_*`` ops in ``kiln.guest.agent``); a
terminal outlives the connections to it. ``PtyAttachment`` is one connection:
its ``output()`` follows the terminal (replaying the agent's scrollback first,
so nothing printed before the connection is lost) and ``write()`` types into it.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import shlex
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import PurePosixPath

from kiln.guest import protocol
from kiln.runtime.agent_client import NO_DEADLINE
from kiln.runtime.errors import RuntimeFailure
from kiln.schemas.pty import PtyCreateRequest, PtyRecord
from kiln.services.errors import NotFound
from kiln.services.guest import GuestTarget, agent_errors
from kiln.services.staged_env import StagedEnv


def _record(target: GuestTarget, info: dict) -> PtyRecord:
    return PtyRecord(
        session_id=info["pty_id"],
        pty_id=info["pty_id"],
        vm_id=target.vm.id,
        pid=info["pid"],
        argv=info["argv"],
        cols=info["cols"],
        rows=info["rows"],
        alive=info["alive"],
        exit_code=info["exit_code"],
        created_at=datetime.fromtimestamp(info["created_at"], UTC),
    )


class PtyAttachment:
    """One connection to a guest terminal; ``close()`` ends it (the terminal stays)."""

    def __init__(self, target: GuestTarget, pty_id: str) -> None:
        self._target = target
        self.pty_id = pty_id
        self._attach_id = secrets.token_hex(8)
        self.exit_code: int | None = None

    async def output(self) -> AsyncIterator[bytes]:
        """The terminal's output until its process ends (or ``close()``)."""
        with agent_errors(self._target):
            # A terminal's output lasts as long as its shell: no deadline.
            async for frame in self._target.agent.stream(
                "pty_attach", timeout=NO_DEADLINE, pty_id=self.pty_id, attach_id=self._attach_id, replay=True
            ):
                if frame.get("kind") == protocol.KIND_STDOUT:
                    yield base64.b64decode(frame["data"])
                elif frame.get("kind") == protocol.KIND_RESULT:
                    self.exit_code = (frame.get("value") or {}).get("exit_code")

    async def write(self, data: bytes) -> None:
        with agent_errors(self._target):
            await self._target.agent.call(
                "pty_write", pty_id=self.pty_id, data=base64.b64encode(data).decode("ascii")
            )

    async def resize(self, cols: int, rows: int) -> None:
        with agent_errors(self._target):
            await self._target.agent.call("pty_resize", pty_id=self.pty_id, cols=cols, rows=rows)

    async def close(self) -> None:
        # The terminal may have ended or the VM gone: then there is nothing to detach.
        with contextlib.suppress(RuntimeFailure):
            await self._target.agent.call(
                "pty_detach", pty_id=self.pty_id, attach_id=self._attach_id
            )


# Shells that take ``-i -l`` (csh and tcsh take ``-l`` only alone: they are exec'd as given).
LOGIN_SHELLS = frozenset({"sh", "bash", "zsh", "dash", "ash", "ksh", "mksh", "fish"})


def shell_command(shell: str) -> str:
    """The command line that starts ``shell`` as an interactive login shell, as
    the SDK's CLI expects of ``pty --shell`` (profile read, prompt set)."""
    return f"exec {shlex.quote(shell)} -i -l"


class PtyService:
    def __init__(self, staged: StagedEnv | None = None) -> None:
        self._staged = staged or StagedEnv()

    async def open(self, target: GuestTarget, request: PtyCreateRequest) -> PtyRecord:
        command, shell = request.command, request.shell
        if command is None and shell is not None and PurePosixPath(shell).name in LOGIN_SHELLS:
            command, shell = shell_command(shell), None
        # Explicit variables of the request win over staged ones of the same name.
        env = {**self._staged.take(target.vm.id), **(request.env or {})}
        with agent_errors(target):
            info = await target.agent.call(
                "pty_open",
                cols=request.cols,
                rows=request.rows,
                command=command,
                shell=shell,
                env=env,
                pty_id=request.id,
            )
        return _record(target, info)

    async def list(self, target: GuestTarget) -> list[PtyRecord]:
        with agent_errors(target):
            listing = await target.agent.call("pty_list")
        return [_record(target, info) for info in listing["ptys"]]

    async def get(self, target: GuestTarget, pty_id: str) -> PtyRecord:
        for record in await self.list(target):
            if record.pty_id == pty_id:
                return record
        raise NotFound(f"terminal {pty_id} not found in vm {target.vm.id}")

    async def resize(self, target: GuestTarget, pty_id: str, cols: int, rows: int) -> PtyRecord:
        with agent_errors(target):
            info = await target.agent.call("pty_resize", pty_id=pty_id, cols=cols, rows=rows)
        return _record(target, info)

    async def kill(self, target: GuestTarget, pty_id: str) -> PtyRecord:
        with agent_errors(target):
            info = await target.agent.call("pty_kill", pty_id=pty_id)
        return _record(target, info)

    async def attach(self, target: GuestTarget, pty_id: str) -> PtyAttachment:
        """A connection to an existing terminal (404 if there is none)."""
        await self.get(target, pty_id)
        return PtyAttachment(target, pty_id)
