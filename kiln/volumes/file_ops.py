"""File access to a volume (``FileOps``, part of ``Volumes``): through the VM
that mounts it rw, for reads through one that mounts it ro, and when no VM has
it through a helper VM that mounts it for the request (``kiln.volumes.helper``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from kiln.node.participant import Mount
from kiln.volumes import hotplug
from kiln.volumes.attach import VmHandle, as_handle
from kiln.volumes.attachments import DRIVE_PREFIX, Attachment
from kiln.volumes.errors import VolumeBusy, VolumeError
from kiln.volumes.files import ByteSource, BytesSource, FileEntry, VolumeFiles
from kiln.volumes.layout import VolumeMeta, VolumePaths
from kiln.volumes.mount_ops import MountOps

# Where a helper VM mounts the volume it works on.
HELPER_MOUNT_PATH = "/mnt/volume"


class FileOps(MountOps):
    @contextlib.asynccontextmanager
    async def files(self, volume_id: str, *, write: bool) -> AsyncIterator[VolumeFiles]:
        """File access to the volume, for as long as the block runs (holding
        its lock): through the VM that mounts it rw; for reads, through a VM
        that mounts it ro; when no VM has it, through a helper VM."""
        async with self._locked(volume_id) as (paths, meta):
            live = self._live(volume_id)
            writer = next((a for a in live if not a.read_only), None)
            chosen = writer or (None if write else next(iter(live), None))
            if live:
                vm = self._running(chosen) if chosen is not None else None
                if vm is None:
                    raise VolumeBusy(
                        f"volume {volume_id} is mounted {'read-only ' if writer is None else ''}in "
                        f"{live[0].vm_id}, which cannot {'write' if write else 'read'} it for us now"
                    )
                assert chosen is not None
                yield VolumeFiles(vm.agent, self._guest(vm.agent), chosen.mount_path)
                return
            async with self._helper_mount(paths, meta, read_only=not write) as (vm, attachment):
                yield VolumeFiles(vm.agent, self._guest(vm.agent), attachment.mount_path)

    @contextlib.asynccontextmanager
    async def _helper_mount(
        self, paths: VolumePaths, meta: VolumeMeta, *, read_only: bool
    ) -> AsyncIterator[tuple[VmHandle, Attachment]]:
        if self.helpers is None:
            raise VolumeError("host-side access to an unmounted volume needs helper VMs, and none are set up")
        async with self.helpers.session() as session:
            vm = as_handle(session.machine)
            mount = Mount(meta.volume_id, HELPER_MOUNT_PATH, read_only=read_only)
            attachment = await self._plan(paths, meta, vm.vm_id, mount, set())
            attachment = await self._plug(vm, attachment)
            try:
                yield vm, attachment
            finally:
                unplugged = False
                try:
                    await self._unplug(vm, paths, meta, attachment, force=True)
                    unplugged = True
                    # Left as it was found: it may serve the next volume.
                    session.reusable = not any(drive.startswith(DRIVE_PREFIX) for drive in await hotplug.drives(vm.qmp))
                finally:
                    if not unplugged:
                        # The helper goes (its release must not wait for this
                        # volume's lock, held here); the volume is checked
                        # before its next mount if the helper wrote it.
                        self._forget(paths, meta, attachment, dirty=attachment.writes_volume)

    async def upload(
        self,
        volume_id: str,
        path: str,
        data: bytes | ByteSource,
        *,
        overwrite: bool = False,
    ) -> FileEntry:
        source = BytesSource(data) if isinstance(data, bytes) else data
        async with self.files(volume_id, write=True) as files:
            return await files.upload(path, source, overwrite=overwrite)

    async def download(self, volume_id: str, path: str) -> bytes:
        async with self.files(volume_id, write=False) as files:
            return await files.download(path)

    async def list_files(
        self,
        volume_id: str,
        prefix: str = "",
        recursive: bool = False,
        limit: int = 1000,
    ) -> list[FileEntry]:
        async with self.files(volume_id, write=False) as files:
            return await files.list(prefix, recursive, limit)

    async def delete_file(self, volume_id: str, path: str, *, recursive: bool = False) -> None:
        async with self.files(volume_id, write=True) as files:
            await files.delete(path, recursive)
