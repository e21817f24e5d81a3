"""What the host asks of a guest for its volumes, behind one small interface.

Today every call runs ``guest_tool.py`` in a python session of the agent
(``ExecGuestVolumes``). The agent is gaining its own ``mount``, ``umount``,
``fsfreeze``, ``fsthaw`` and ``disk_usage`` ops; ``AgentOpsGuestVolumes`` uses
them for those five and the tool for the rest. Switching is the one line in
``guest_volumes``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import guest_tool
from kiln.volumes.errors import GuestVolumeError

# Mounting waits this long for a hot-added disk to be scanned by the guest.
DISK_APPEAR_SECONDS = 10.0
# A freeze nobody thaws is thawed by the guest after this long.
FREEZE_MAX_SECONDS = 60.0
CALL_SECONDS = 60.0


class Agent(Protocol):
    """What this package needs of a guest agent client (``kiln.runtime.agent_client.AgentClient``)."""

    async def call(
        self, op: str, timeout: float | None = None, **args: object
    ) -> dict: ...

    def stream(
        self, op: str, timeout: float | None = None, **args: object
    ) -> AsyncIterator[dict]: ...


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class GuestDisk:
    device: str
    serial: str | None
    mount_paths: tuple[str, ...]


class GuestVolumes(Protocol):
    async def mount(self, serial: str, mount_path: str, read_only: bool) -> str:
        """Mount the disk with this serial (waiting for a hot-added one) at
        ``mount_path`` (created), ext4, nodev and nosuid; read-only also
        ``noload``. Idempotent. Returns the guest's device path."""
        ...

    async def umount(
        self, mount_path: str, serial: str | None = None, force: bool = False
    ) -> None:
        """Sync and unmount (lazily with ``force`` when files are open); with
        ``serial``, also delete the SCSI disk in the guest so that the host
        can unplug it. Idempotent."""
        ...

    async def freeze(self, mount_path: str) -> None: ...

    async def thaw(self, mount_path: str) -> None: ...

    async def usage(self, path: str) -> Usage: ...

    async def grow(self, serial: str, mount_path: str, size_bytes: int) -> Usage:
        """After the host grew the disk: rescan it and grow the mounted ext4."""
        ...

    async def disks(self) -> list[GuestDisk]: ...

    async def file_op(self, op: str, **args: object) -> dict[str, Any]:
        """One of guest_tool's ``file_*`` ops (paths relative to ``root``)."""
        ...


@cache
def tool_source() -> str:
    return Path(guest_tool.__file__).read_text()


@cache
def tool_session() -> str:
    """The agent's python session the tool lives in: named after its source,
    so a guest still holding an older tool gets the new one loaded beside it."""
    return f"kiln-volumes-{hashlib.sha256(tool_source().encode()).hexdigest()[:12]}"


TOOL_NAME = "_kiln_volume_tool"
NOT_LOADED = '{"ok": false, "error": "ENOTLOADED", "message": ""}'


def call_code(request: str) -> str:
    return (
        f"if {TOOL_NAME!r} in globals(): {TOOL_NAME}.answer({request!r})\n"
        f"else: print({NOT_LOADED!r})\n"
    )


def load_code() -> str:
    return (
        f"import types as _types\n"
        f"{TOOL_NAME} = _types.ModuleType('kiln_volume_tool')\n"
        f"exec(compile({tool_source()!r}, 'kiln/volumes/guest_tool.py', 'exec'), {TOOL_NAME}.__dict__)\n"
    )


class ExecGuestVolumes:
    """Every operation is a call of ``guest_tool.py`` in a persistent python
    session of the agent (loaded by the first call in a VM): a python process
    per call cost a second or more of imports and compiling under TCG."""

    def __init__(self, agent: Agent, timeout: float = CALL_SECONDS) -> None:
        self._agent = agent
        self._timeout = timeout

    async def _python(self, code: str) -> tuple[str, str, int | None]:
        stdout = bytearray()
        stderr = bytearray()
        exit_code = None
        try:
            async for frame in self._agent.stream(
                "python_exec", session=tool_session(), code=code, timeout=self._timeout
            ):
                if frame.get("kind") == "stdout":
                    stdout += base64.b64decode(frame["data"])
                elif frame.get("kind") == "stderr":
                    stderr += base64.b64decode(frame["data"])
                elif frame.get("kind") == "result":
                    exit_code = frame["value"].get("exit_code")
        except RuntimeFailure as error:
            raise GuestVolumeError(
                "EAGENT", f"the guest's volume tool failed: {error}"
            ) from error
        return (
            bytes(stdout).decode(errors="replace"),
            bytes(stderr).decode(errors="replace"),
            exit_code,
        )

    async def run_tool(self, op: str, **args: object) -> Any:
        code = call_code(json.dumps({"op": op, "args": args}))
        answer = await self._answer(op, code)
        if answer.get("error") == "ENOTLOADED":
            _, errors, exit_code = await self._python(load_code())
            if exit_code != 0:
                raise GuestVolumeError(
                    "EIO", f"cannot load the volume tool in the guest: {errors[-1000:]}"
                )
            answer = await self._answer(op, code)
        if not answer.get("ok"):
            raise GuestVolumeError(
                str(answer.get("error", "EIO")), str(answer.get("message", ""))
            )
        return answer.get("value")

    async def _answer(self, op: str, code: str) -> dict:
        output, errors, exit_code = await self._python(code)
        try:
            return dict(json.loads(output.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            raise GuestVolumeError(
                "EIO",
                f"volume op {op} gave no answer (exit {exit_code}): {errors.strip()[-1000:]}",
            ) from None

    async def mount(self, serial: str, mount_path: str, read_only: bool) -> str:
        value = await self.run_tool(
            "mount",
            serial=serial,
            mount_path=mount_path,
            read_only=read_only,
            wait=DISK_APPEAR_SECONDS,
        )
        return str(value["device"])

    async def umount(
        self, mount_path: str, serial: str | None = None, force: bool = False
    ) -> None:
        await self.run_tool("umount", mount_path=mount_path, serial=serial, force=force)

    async def freeze(self, mount_path: str) -> None:
        await self.run_tool(
            "freeze", mount_path=mount_path, max_seconds=FREEZE_MAX_SECONDS
        )

    async def thaw(self, mount_path: str) -> None:
        await self.run_tool("thaw", mount_path=mount_path)

    async def usage(self, path: str) -> Usage:
        return Usage(**await self.run_tool("usage", path=path))

    async def grow(self, serial: str, mount_path: str, size_bytes: int) -> Usage:
        return Usage(
            **await self.run_tool(
                "grow", serial=serial, mount_path=mount_path, size_bytes=size_bytes
            )
        )

    async def disks(self) -> list[GuestDisk]:
        value = await self.run_tool("mounts")
        return [
            GuestDisk(
                disk["device"],
                disk["serial"],
                tuple(m["mount_path"] for m in disk["mounts"]),
            )
            for disk in value["disks"]
        ]

    async def file_op(self, op: str, **args: object) -> dict[str, Any]:
        return dict(await self.run_tool(op, **args))


class AgentOpsGuestVolumes(ExecGuestVolumes):
    """The agent's own volume ops where it has them (its contract:
    ``mount {serial, mount_path, read_only, fsck?} -> {device, mount_path}``,
    ``umount {mount_path, serial?, force?}``, ``fsfreeze``/``fsthaw {mount_path}``,
    ``disk_usage {path} -> {used_bytes, total_bytes, free_bytes}``)."""

    async def call(self, op: str, **args: object) -> dict:
        try:
            return await self._agent.call(op, timeout=self._timeout, **args)
        except RuntimeFailure as error:
            raise GuestVolumeError(
                str(getattr(error, "code", "EAGENT")), str(error)
            ) from error

    async def mount(self, serial: str, mount_path: str, read_only: bool) -> str:
        value = await self.call(
            "mount", serial=serial, mount_path=mount_path, read_only=read_only
        )
        return str(value["device"])

    async def umount(
        self, mount_path: str, serial: str | None = None, force: bool = False
    ) -> None:
        await self.call("umount", mount_path=mount_path, serial=serial, force=force)

    async def freeze(self, mount_path: str) -> None:
        await self.call("fsfreeze", mount_path=mount_path)

    async def thaw(self, mount_path: str) -> None:
        await self.call("fsthaw", mount_path=mount_path)

    async def usage(self, path: str) -> Usage:
        return Usage(**await self.call("disk_usage", path=path))


def guest_volumes(agent: Agent) -> GuestVolumes:
    """The guest side of volumes. Switch to ``AgentOpsGuestVolumes`` once the
    agent's volume ops are in every image."""
    return ExecGuestVolumes(agent)
