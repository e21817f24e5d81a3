"""``Volumes``: the one object the service layer and the pipeline participant
use. It holds each volume's lock around every operation and decides where
each one runs: offline on the image, through the VM that has the volume
mounted (its QMP and agent), or in a helper VM.

This module holds the volumes themselves (create, resize, usage, check,
delete, recovery at start); the rest of ``Volumes`` is one module a
mechanism: ``access`` (the lock, which VM reaches a volume),
``checkpoint_ops``, ``mount_ops`` and ``file_ops``.

What it keeps is on disk (``kiln.volumes.layout``); the service layer keeps
the user's side (names, owners, quotas, which mounts a VM should have) and
calls this with ids.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass

from kiln.volumes import hotplug, images, procfs
from kiln.volumes.attachments import Attachment
from kiln.volumes.checkpoint_ops import CheckpointInfo, CheckpointOps
from kiln.volumes.errors import VolumeBusy, VolumeError
from kiln.volumes.file_ops import FileOps
from kiln.volumes.layout import VolumeMeta, VolumePaths, allocated_bytes, check_id, open_to_vms, top_path, write_meta
from kiln.volumes.tools import FsckOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    size_bytes: int  # the filesystem's size: the quota, rounded down to 4 KiB
    used_bytes: int
    used_at: float | None
    needs_check: bool
    allocated_bytes: int  # what all its files take on the host
    checkpoints: tuple[CheckpointInfo, ...]
    attachments: tuple[Attachment, ...]


class Volumes(FileOps, CheckpointOps):
    """Every operation on this host's volumes, by id (see the module's docstring)."""

    async def create(self, volume_id: str, quota_bytes: int) -> VolumeInfo:
        check_id(volume_id, "volume id")
        size = images.image_size(quota_bytes, self.settings.volume_min_bytes, self.settings.volume_max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        paths = self.paths(volume_id)
        # mkdir decides between two creates of one id; until volume.json is
        # written, the volume does not exist for anyone (VolumeNotFound).
        meta = await images.create(paths, size, self.tools_user)
        open_to_vms(paths, meta, self._vm_owner())
        return self._info(paths, meta)

    async def get(self, volume_id: str) -> VolumeInfo:
        async with self._locked(volume_id) as (paths, meta):
            return self._info(paths, meta)

    def exists(self, volume_id: str) -> bool:
        return self.paths(volume_id).meta.exists()

    async def delete(self, volume_id: str) -> None:
        """Remove the volume, its checkpoints and every file. Refused while any
        VM has it (or one of its checkpoints) attached."""
        async with self._locked(volume_id) as (paths, _meta):
            attached = self.store.of_volume(volume_id)
            if attached:
                raise VolumeBusy(f"volume {volume_id} is mounted in {attached[0].vm_id}")
            if procfs.holders(paths.root):
                raise VolumeBusy(f"volume {volume_id} is open in a process this host has no record of")
            images.delete(paths)

    async def resize(self, volume_id: str, quota_bytes: int) -> VolumeInfo:
        """Grow (online through the VM that mounts it rw, or offline) or shrink
        (offline only, never below what it holds)."""
        size = images.image_size(quota_bytes, self.settings.volume_min_bytes, self.settings.volume_max_bytes)
        async with self._locked(volume_id) as (paths, meta):
            live = self._live(volume_id)
            if not live:
                self._require_no_live_view(paths, volume_id, "resizing")
                await images.resize(paths, meta, size, self.tools_user)
                return self._info(paths, meta)
            writer, vm = self._writer(live)
            if writer is None or vm is None:
                raise VolumeBusy(
                    f"volume {volume_id} is mounted read-only or in a VM that is not running; "
                    "it grows online only through a running rw mount"
                )
            if size < meta.size_bytes:
                raise VolumeBusy(f"volume {volume_id} is mounted in {writer.vm_id}; unmount it to shrink it")
            if size == meta.size_bytes:
                return self._info(paths, meta)
            await hotplug.resize_drive(vm.qmp, writer.drive_id, size)
            meta.size_bytes = size
            write_meta(paths, meta)
            usage = await self._guest(vm.agent).grow(writer.drive_id, writer.mount_path, size)
            meta.used_bytes, meta.used_at = usage.used_bytes, time.time()
            write_meta(paths, meta)
            return self._info(paths, meta)

    async def refresh_usage(self, volume_id: str) -> VolumeInfo:
        """``used_bytes`` as the filesystem counts it now: from the guest that
        mounts it rw, else (when nothing has it) from the image's superblock,
        else (mounted ro, or in a VM that is not running) as last known."""
        async with self._locked(volume_id) as (paths, meta):
            live = self._live(volume_id)
            writer, vm = self._writer(live)
            if writer is not None and vm is not None:
                usage = await self._guest(vm.agent).usage(writer.mount_path)
                meta.used_bytes, meta.used_at = usage.used_bytes, time.time()
                write_meta(paths, meta)
            elif not live and not meta.needs_check and not procfs.is_held(top_path(paths, meta)):
                await images.measure(paths, meta, self.tools_user)
            return self._info(paths, meta)

    async def check(self, volume_id: str) -> FsckOutcome:
        """Check and repair the filesystem now (it must be unmounted)."""
        async with self._locked(volume_id) as (paths, meta):
            self._require_no_live_view(paths, volume_id, "a check")
            return await images.check(paths, meta, self.tools_user)

    def _info(self, paths: VolumePaths, meta: VolumeMeta) -> VolumeInfo:
        return VolumeInfo(
            volume_id=meta.volume_id,
            size_bytes=meta.size_bytes,
            used_bytes=meta.used_bytes,
            used_at=meta.used_at,
            needs_check=meta.needs_check,
            allocated_bytes=sum(allocated_bytes(path) for path in paths.root.rglob("*.qcow2")),
            checkpoints=tuple(self._checkpoints(paths, meta)),
            attachments=tuple(self.store.of_volume(meta.volume_id)),
        )

    async def close(self) -> None:
        """At shutdown: stop the helper VM that waits for work."""
        if self.helpers is not None:
            await self.helpers.close()

    async def recover(self) -> None:
        """At start: finish or undo what a dead process left half done in each
        volume, and remove volumes whose creation never finished."""
        if not self.root.is_dir():
            return
        for directory in sorted(self.root.iterdir()):
            if not directory.is_dir() or directory.name.startswith("."):
                continue
            if not (directory / "volume.json").exists():
                log.warning("removing %s: its creation never finished", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            with contextlib.suppress(VolumeError):
                async with self._locked(directory.name):
                    pass
