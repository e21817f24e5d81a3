"""QMP: one control connection per VM (``qemu.qmp``), and the migration
commands saves and restores are made of.

Saves and restores move the VM's state through file descriptors Kiln opens and
hands to QEMU over QMP (``getfd`` + ``fd:``), never through ``exec:``: QEMU's
seccomp sandbox forbids it to spawn anything, and no path is ever quoted for a
shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from qemu.qmp import QMPClient, QMPError, Runstate

from kiln.runtime.errors import RuntimeFailure

QMP_CONNECT_ATTEMPT_SECONDS = 2.0
# A save pauses the guest; poll its progress often so the pause stays short.
MIGRATION_POLL_SECONDS = 0.005
MIGRATION_BANDWIDTH = 1 << 40  # bytes/s: no limit, in effect
SAVE_FD_NAME = "kiln-save"
RESTORE_FD_NAME = "kiln-restore"


class QemuError(RuntimeFailure):
    """A QMP command failed or QMP could not be reached."""


class QmpConnection:
    """One QMP session to a VM, reconnected on demand. QEMU serves one QMP client
    at a time, so there is one of these per VM in the server."""

    def __init__(self, socket_path: Path, name: str) -> None:
        self.socket_path = socket_path
        self._name = name
        self._client: QMPClient | None = None
        self._lock = asyncio.Lock()
        # A passed fd travels beside the command stream; no command may be
        # written between it and the getfd that names it.
        self._fd_lock = asyncio.Lock()

    async def connect(self, timeout: float = QMP_CONNECT_ATTEMPT_SECONDS) -> None:
        async with self._lock:
            if self._client is not None and self._client.runstate == Runstate.RUNNING:
                return
            await self._drop()
            client = QMPClient(self._name)
            try:
                await asyncio.wait_for(client.connect(str(self.socket_path)), timeout)
            except (QMPError, OSError, TimeoutError) as error:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                raise QemuError(f"cannot reach QMP at {self.socket_path}: {error!r}") from error
            self._client = client

    async def execute(self, command: str, timeout: float = 30.0, **arguments: object) -> object:
        return await self.run(command, arguments, timeout)

    async def run(self, command: str, arguments: dict[str, object], timeout: float = 30.0) -> object:
        """``execute`` with the arguments as a dict (for names such as ``node-name``)."""
        await self.connect()
        assert self._client is not None
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments or None), timeout)
        except (QMPError, OSError, TimeoutError) as error:
            raise QemuError(f"QMP {command} failed: {error}") from error

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a copy of ``fd`` under ``name`` (the caller keeps and closes its own)."""
        await self.connect()
        assert self._client is not None
        async with self._fd_lock:
            with contextlib.suppress(QemuError):
                # A name left by an interrupted save would make getfd replace it
                # silently; closing first keeps the intent explicit.
                await self.execute("closefd", fdname=name)
            try:
                self._client.send_fd_scm(fd)
            except (QMPError, OSError) as error:
                raise QemuError(f"cannot pass a file descriptor to QEMU: {error}") from error
            await self.execute("getfd", fdname=name)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()

    # Helpers for suspend and snapshots.

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "postmigrate", ..."""
        return str((await self.execute("query-status"))["status"])  # type: ignore[index]

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def migrate_to_file(self, path: Path, timeout: float = 300.0) -> None:
        """Save the (preferably paused) VM's memory and device state into the new
        file ``path`` (mode 0600), through a file descriptor."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await self.pass_fd(fd, SAVE_FD_NAME)
        finally:
            os.close(fd)
        await self.execute("migrate", uri=f"fd:{SAVE_FD_NAME}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.execute("query-migrate")
            if not isinstance(info, dict):
                raise QemuError(f"query-migrate answered {info!r}")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration to {path} {status}: {info.get('error-desc', '')}")
            await asyncio.sleep(MIGRATION_POLL_SECONDS)
        await self.execute("migrate_cancel")
        raise QemuError(f"migration to {path} did not finish within {timeout:g}s")

    async def prepare_migration(self, *, ignore_shared_memory: bool) -> None:
        """Set what a save and its restore must agree on.

        ``x-ignore-shared`` leaves RAM in a shared memory-backend-file out of the
        stream (the file is the memory); both ends must set it alike. The
        bandwidth limit (32 MiB/s by default) is for live migration over a
        network; a save to a local file wants none."""
        await self.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared_memory}],
        )
        await self.execute("migrate-set-parameters", **{"max-bandwidth": MIGRATION_BANDWIDTH})

    async def migrate_from_file(self, path: Path, timeout: float = 120.0) -> None:
        """Load the state saved in ``path`` into a QEMU started with ``-incoming
        defer``; returns once the guest runs."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self.pass_fd(fd, RESTORE_FD_NAME)
        finally:
            os.close(fd)
        await self.execute("migrate-incoming", uri=f"fd:{RESTORE_FD_NAME}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.status()
            if status == "running":
                return
            if status == "paused":
                # Saved while paused (as every save is): QEMU keeps it so.
                await self.resume()
                return
            if status not in ("inmigrate", "prelaunch"):
                raise QemuError(f"loading {path} ended with the VM {status}")
            await asyncio.sleep(MIGRATION_POLL_SECONDS)
        raise QemuError(f"loading {path} did not finish within {timeout:g}s")
