"""Mounts of volumes in VMs (``MountOps``, part of ``Volumes``): planned
before a VM starts or hot, plugged and mounted, unmounted and unplugged, and
released when the VM goes (``kiln.volumes.attach`` holds the steps).
"""

from __future__ import annotations

import contextlib
import logging

from kiln.node.participant import Mount, SavedDrive
from kiln.runtime.driver import ScsiDrive
from kiln.volumes import attach, hotplug, images
from kiln.volumes.access import VolumeAccess
from kiln.volumes.attach import VmHandle, as_handle
from kiln.volumes.attachments import ATTACHED, MOUNTED, Attachment, drive_id_for
from kiln.volumes.errors import VolumeError, VolumeNotFound
from kiln.volumes.layout import VolumeMeta, VolumePaths, write_meta

log = logging.getLogger(__name__)


class MountOps(VolumeAccess):
    def attachments(self, vm_id: str) -> list[Attachment]:
        return self.store.of_vm(vm_id)

    async def plan(self, vm_id: str, mount: Mount, taken_scsi_ids: set[int] | None = None) -> Attachment:
        """Record ``mount`` for ``vm_id`` before its drive exists (a VM about to
        start, or a hot attach). Checks what this host can check (exclusivity,
        the checkpoint) and runs a pending filesystem check first."""
        async with self._locked(mount.volume_id) as (paths, meta):
            return await self._plan(paths, meta, vm_id, mount, taken_scsi_ids or set())

    async def _plan(
        self, paths: VolumePaths, meta: VolumeMeta, vm_id: str, mount: Mount, taken: set[int]
    ) -> Attachment:
        if mount.checkpoint_id is None and meta.needs_check:
            self._require_no_live_view(paths, meta.volume_id, "the check after a crash")
            log.info("volume %s was in use by a VM that died: checking it first", meta.volume_id)
            await images.check(paths, meta, self.tools_user)
        return await attach.plan(self.store, paths, meta, vm_id, mount, taken, self._vm_owner())

    async def plan_saved(self, vm_id: str, drive: SavedDrive) -> Attachment:
        """Record the placeholder of a drive ``vm_id``'s saved state has (a
        restore of a snapshot taken with volumes mounted): it goes on the
        command line at its saved target, and ``mount_all`` swaps it for the
        real mount once the guest is up."""
        async with self._locked(drive.volume_id) as (paths, meta):
            return await attach.plan_saved(self.store, paths, meta, vm_id, drive, self._vm_owner())

    def drives_at_start(self, vm_id: str, *, restoring: bool) -> list[ScsiDrive]:
        return attach.drives_at_start(self.store.of_vm(vm_id), restoring=restoring)

    async def attach(self, machine: object, mount: Mount) -> Attachment:
        """Hot attach: plan, plug into the running VM, mount in the guest."""
        vm = as_handle(machine)
        async with self._locked(mount.volume_id) as (paths, meta):
            taken = await hotplug.scsi_ids_in_use(vm.qmp)
            attachment = await self._plan(paths, meta, vm.vm_id, mount, taken)
            return await self._plug(vm, attachment)

    async def _plug(self, vm: VmHandle, attachment: Attachment) -> Attachment:
        try:
            return await attach.plug_and_mount(self.store, self._guest(vm.agent), vm, attachment)
        except BaseException:
            if attachment.state not in (ATTACHED, MOUNTED):
                # Ours alone: nothing of it was there before this call.
                with contextlib.suppress(VolumeError, OSError):
                    await hotplug.remove_drive(vm.qmp, attachment.drive_id)
                attach.forget(self.store, attachment)
            raise

    async def _unplug(
        self, vm: VmHandle, paths: VolumePaths, meta: VolumeMeta, attachment: Attachment, *, force: bool
    ) -> None:
        await attach.unmount_and_unplug(self.store, self._guest(vm.agent), vm, paths, meta, attachment, force=force)

    async def mount_all(self, machine: object, keep: tuple[Mount, ...]) -> list[Attachment]:
        """Bring the VM's drives in line with ``keep`` (its mounts): each one
        plugged and mounted (idempotent: a resumed guest has its mounts
        already; a mount without a record yet is planned now), every other
        record of the VM taken away, placeholders first (a restored snapshot's
        drives, replaced by the real mounts at the same paths)."""
        vm_id = str(getattr(machine, "vm_id", ""))
        if not keep and not self.store.of_vm(vm_id):
            return []  # nothing to do, whatever the VM's driver can plug
        vm = as_handle(machine)
        wanted = {drive_id_for(m.volume_id, m.mount_path, m.checkpoint_id): m for m in keep}
        mounted = []
        for attachment in self.store.of_vm(vm.vm_id):
            async with self._locked(attachment.volume_id) as (paths, meta):
                if attachment.drive_id in wanted and not attachment.placeholder:
                    del wanted[attachment.drive_id]
                    mounted.append(await self._plug(vm, attachment))
                else:
                    await self._unplug(vm, paths, meta, attachment, force=True)
        for mount in wanted.values():
            mounted.append(await self.attach(vm, mount))
        return mounted

    async def detach(self, machine: object, volume_id: str, mount_path: str, *, force: bool = False) -> None:
        """Hot detach: the guest syncs and unmounts (refused while files are
        open, unless ``force``), then the drive is unplugged."""
        vm = as_handle(machine)
        async with self._locked(volume_id) as (paths, meta):
            found = [a for a in self.store.of_vm(vm.vm_id) if a.volume_id == volume_id and a.mount_path == mount_path]
            if not found:
                raise VolumeNotFound(f"volume {volume_id} is not mounted at {mount_path} in {vm.vm_id}")
            await self._unplug(vm, paths, meta, found[0], force=force)
            await self._compact_if_idle(paths, meta)

    async def detach_all(self, machine: object, *, force: bool = True) -> None:
        vm = as_handle(machine)
        for attachment in self.store.of_vm(vm.vm_id):
            async with self._locked(attachment.volume_id) as (paths, meta):
                await self._unplug(vm, paths, meta, attachment, force=force)

    async def release(self, vm_id: str, drive_ids: set[str] | None = None) -> list[Attachment]:
        """The VM is gone, or going: forget its attachments (those of
        ``drive_ids``; None: all) and throwaway tops. If it still runs, its
        guest unmounts first; if it died with a volume mounted rw, that volume
        is checked before its next mount."""
        released = []
        for attachment in self.store.of_vm(vm_id):
            if drive_ids is not None and attachment.drive_id not in drive_ids:
                continue
            try:
                async with self._locked(attachment.volume_id) as (paths, meta):
                    await self._release_one(paths, meta, attachment)
            except VolumeNotFound:
                attach.forget(self.store, attachment)
            released.append(attachment)
        return released

    async def _release_one(self, paths: VolumePaths, meta: VolumeMeta, attachment: Attachment) -> None:
        vm = self._running(attachment)
        if vm is not None and attachment.state in (ATTACHED, MOUNTED):
            with contextlib.suppress(VolumeError):
                await self._unplug(vm, paths, meta, attachment, force=True)
                return
        dirty = attachment.writes_volume and attachment.state in (ATTACHED, MOUNTED)
        self._forget(paths, meta, attachment, dirty=dirty)

    def _forget(self, paths: VolumePaths, meta: VolumeMeta, attachment: Attachment, *, dirty: bool) -> None:
        """Forget a record whose drive went without a clean unmount; ``dirty``: it
        may have written the volume, which is checked before its next mount."""
        if dirty:
            meta.needs_check = True
            write_meta(paths, meta)
        attach.forget(self.store, attachment)
