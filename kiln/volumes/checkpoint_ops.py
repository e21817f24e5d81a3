"""Checkpoints of a volume (``CheckpointOps``, part of ``Volumes``): taken
offline on the chain, or with the guest's filesystem frozen while its drive
moves onto a new top; kept for a save of the VM that mounts volumes
(``pause_and_capture``); deleted and their layers merged once nothing has the
volume (``kiln.volumes.chain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kiln.node.participant import SavedDrive
from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import chain, hotplug, procfs
from kiln.volumes.access import VolumeAccess
from kiln.volumes.attach import VmHandle, as_handle
from kiln.volumes.attachments import ATTACHED, MOUNTED, Attachment
from kiln.volumes.errors import CheckpointNotFound, VolumeBusy
from kiln.volumes.layout import VolumeMeta, VolumePaths, allocated_bytes, check_id, top_path


@dataclass(frozen=True)
class CheckpointInfo:
    checkpoint_id: str
    created_at: float
    size_bytes: int  # what its own layer takes on the host (copy-on-write: the changes only)

    @classmethod
    def of(cls, paths: VolumePaths, layer: chain.Layer) -> CheckpointInfo:
        assert layer.checkpoint_id is not None
        return cls(layer.checkpoint_id, layer.created_at, allocated_bytes(paths.layer(layer.layer_id)))


class CheckpointOps(VolumeAccess):
    def _checkpoints(self, paths: VolumePaths, meta: VolumeMeta) -> list[CheckpointInfo]:
        return [CheckpointInfo.of(paths, layer) for layer in meta.layers if layer.checkpoint_id is not None]

    async def checkpoints(self, volume_id: str) -> list[CheckpointInfo]:
        async with self._locked(volume_id) as (paths, meta):
            return self._checkpoints(paths, meta)

    async def create_checkpoint(self, volume_id: str, checkpoint_id: str) -> CheckpointInfo:
        """Capture the volume as it is now. Mounted rw in a running VM: its
        filesystem is frozen (the guest flushes and holds every write) while
        the drive moves onto a new top, and thawed after, whatever happens."""
        check_id(checkpoint_id, "checkpoint id")
        async with self._locked(volume_id) as (paths, meta):
            if meta.checkpoint_layer(checkpoint_id) is not None:
                raise VolumeBusy(f"volume {volume_id} has a checkpoint {checkpoint_id} already")
            if len(meta.layers) >= self.settings.volume_max_layers:
                if not self.store.of_volume(volume_id):
                    await chain.compact(paths, meta)
                if len(meta.layers) >= self.settings.volume_max_layers:
                    raise VolumeBusy(
                        f"volume {volume_id} has {len(meta.layers)} layers, the most it may have; delete checkpoints"
                    )
            live = self._live(volume_id)
            writer, vm = self._writer(live)
            if writer is None or vm is None:
                # Offline: nothing may write the top while it is frozen. Readers
                # may read it (it keeps its content); a writer that is not
                # running (suspended) resumes onto the new top, same content.
                if procfs.is_held(top_path(paths, meta)) and (writer is not None or not live):
                    raise VolumeBusy(f"volume {volume_id} is open in a VM this host cannot reach")
                layer = await chain.checkpoint(paths, meta, checkpoint_id, owner=self._vm_owner())
            else:
                layer = await self._checkpoint_online(paths, meta, checkpoint_id, writer, vm)
            if writer is not None:
                # Its drive now writes the new top: a resume must open that one.
                self.store.save(dataclasses.replace(writer, image=str(top_path(paths, meta))))
            return CheckpointInfo.of(paths, layer)

    async def _checkpoint_online(
        self, paths: VolumePaths, meta: VolumeMeta, checkpoint_id: str, writer: Attachment, vm: VmHandle
    ) -> chain.Layer:
        guest = self._guest(vm.agent)
        await guest.freeze(writer.mount_path)
        try:
            return await self._checkpoint_drive(vm, paths, meta, checkpoint_id, writer.drive_id)
        finally:
            await guest.thaw(writer.mount_path)

    async def _checkpoint_drive(
        self, vm: VmHandle, paths: VolumePaths, meta: VolumeMeta, checkpoint_id: str, drive_id: str
    ) -> chain.Layer:
        """A checkpoint of a volume the running ``vm`` writes through ``drive_id``:
        the drive moves onto the chain's new top (``blockdev-snapshot``)."""

        async def switch(top: Path) -> None:
            await hotplug.snapshot_drive(vm.qmp, drive_id, top)

        return await chain.checkpoint(paths, meta, checkpoint_id, switch, self._vm_owner())

    def check_capturable(self, vm_id: str) -> None:
        """VolumeBusy if a save of ``vm_id`` could not keep its drives' content
        (``capture``): a writable checkpoint mount writes a throwaway layer
        that only lives as long as the mount."""
        for attachment in self.store.of_vm(vm_id):
            if attachment.scratch and not attachment.placeholder:
                raise VolumeBusy(
                    f"{attachment.mount_path} in {vm_id} is checkpoint {attachment.checkpoint_id} "
                    "mounted rw, whose writes are thrown away at unmount: a snapshot cannot keep "
                    "them; unmount it (or mount the checkpoint ro) first"
                )

    async def pause_and_capture(self, machine: object, checkpoint_id: str, *, flush: bool = False) -> list[SavedDrive]:
        """For a save of the VM that is about to follow: pause the guest (when
        it has volume drives) and keep what each drive holds at this point: a
        checkpoint ``checkpoint_id`` of every volume it mounts (the drive of a
        rw mount moves onto a new top, as for any checkpoint), the mount's own
        checkpoint for a checkpoint mounted ro. No freeze is needed: the
        memory saved next is the guest at this very point, as a resume sees
        it. The guest stays paused for the save (which continues it); on a
        failure here it continues at once. ``flush`` (the VM stops after the
        save): every rw mount's dirty data reaches the volume first (a freeze
        and thaw), since the volume lives on without the guest's page cache.
        Returns the drives as a restore needs them (none: the VM was not paused)."""
        vm = as_handle(machine)
        attachments = [
            a for a in self.store.of_vm(vm.vm_id)
            if a.state in (ATTACHED, MOUNTED) and not a.placeholder
        ]  # fmt: skip
        if not attachments:
            return []
        self.check_capturable(vm.vm_id)
        async with contextlib.AsyncExitStack() as stack:
            # Every lock before the pause (in id order: the only place that
            # holds several), so that nothing waits for a paused guest here.
            held = {
                volume_id: await stack.enter_async_context(self._locked(volume_id))
                for volume_id in sorted({a.volume_id for a in attachments})
            }
            if flush:
                guest = self._guest(vm.agent)
                for attachment in attachments:
                    if attachment.writes_volume:
                        await guest.freeze(attachment.mount_path)
                        await guest.thaw(attachment.mount_path)
            await hotplug.pause(vm.qmp)
            try:
                drives = [await self._capture_one(vm, *held[a.volume_id], a, checkpoint_id) for a in attachments]
            except BaseException:
                with contextlib.suppress(RuntimeFailure):
                    await hotplug.resume(vm.qmp)
                raise
        return drives

    async def _capture_one(
        self, vm: VmHandle, paths: VolumePaths, meta: VolumeMeta, attachment: Attachment, checkpoint_id: str
    ) -> SavedDrive:
        source = attachment.checkpoint_id
        if attachment.live_view:
            await self._capture_live(vm, paths, meta, attachment, checkpoint_id)
            source = checkpoint_id
        assert source is not None
        return SavedDrive(
            volume_id=attachment.volume_id,
            mount_path=attachment.mount_path,
            read_only=attachment.read_only,
            checkpoint_id=attachment.checkpoint_id,
            drive_id=attachment.drive_id,
            scsi_id=attachment.scsi_id,
            source_checkpoint_id=source,
        )

    async def _capture_live(
        self, vm: VmHandle, paths: VolumePaths, meta: VolumeMeta, attachment: Attachment, checkpoint_id: str
    ) -> None:
        if meta.checkpoint_layer(checkpoint_id) is not None:
            return  # the same volume at another path of this VM
        if len(meta.layers) >= self.settings.volume_max_layers:
            raise VolumeBusy(
                f"volume {meta.volume_id} has {len(meta.layers)} layers, the most it may have; "
                "delete checkpoints or snapshots of VMs that mounted it"
            )
        if attachment.read_only:
            # No writer while it is mounted ro: the reader keeps reading the
            # file that becomes the checkpoint's layer (same content).
            await chain.checkpoint(paths, meta, checkpoint_id, owner=self._vm_owner())
            return
        await self._checkpoint_drive(vm, paths, meta, checkpoint_id, attachment.drive_id)
        self.store.save(dataclasses.replace(attachment, image=str(top_path(paths, meta))))

    async def delete_checkpoint(self, volume_id: str, checkpoint_id: str) -> None:
        """Forget a checkpoint (refused while it is mounted somewhere); its
        layer's space comes back once no VM has the volume (``compact``)."""
        async with self._locked(volume_id) as (paths, meta):
            if meta.checkpoint_layer(checkpoint_id) is None:
                raise CheckpointNotFound(f"volume {volume_id} has no checkpoint {checkpoint_id}")
            users = [a for a in self.store.of_volume(volume_id) if a.checkpoint_id == checkpoint_id]
            if users:
                raise VolumeBusy(f"checkpoint {checkpoint_id} is mounted in {users[0].vm_id}")
            chain.forget_checkpoint(paths, meta, checkpoint_id)
            await self._compact_if_idle(paths, meta)

    async def compact(self, volume_id: str) -> int:
        """Reclaim the layers of deleted checkpoints, if no VM has the volume."""
        async with self._locked(volume_id) as (paths, meta):
            return await self._compact_if_idle(paths, meta)
