"""The node's face of volumes (``kiln.volumes``): the mechanism itself for
what needs no VM (create, resize, checkpoints, files), and the operations on a
running VM, which go through the VM's save lock and the ledger (hot attach and
detach, keeping the drives' content for a save)."""

from __future__ import annotations

import contextlib

from kiln.node.machines import MachineRegistry
from kiln.node.participant import Mount, SavedDrive
from kiln.runtime.driver import Machine
from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import Attachment, HelperVms, VolumeBusy, VolumeParticipant, Volumes, hotplug
from kiln.volumes.attach import as_handle

# The rule for guest mount paths (absolute, normalised, not a system
# directory): ``InvalidVolumeRequest`` says why a path cannot be used.
from kiln.volumes.attachments import check_mount_path

__all__ = ["NodeVolumes", "check_mount_path"]


class NodeVolumes:
    def __init__(self, volumes: Volumes, participant: VolumeParticipant, machines: MachineRegistry) -> None:
        self.volumes = volumes
        self.participant = participant
        self._machines = machines

    def use_helpers(self, helpers: HelperVms) -> None:
        """Helper VMs for file access to unmounted volumes (they need the
        node to start them, so they come once it exists)."""
        self.volumes.helpers = helpers

    async def start(self) -> None:
        """At server start: finish or undo what a dead process left half done."""
        await self.volumes.recover()

    async def close(self) -> None:
        """At shutdown: the helper VM waiting for work goes."""
        await self.volumes.close()

    def _running(self, vm_id: str) -> Machine:
        machine = self._machines.get(vm_id)
        if machine is None:
            raise VolumeBusy(f"vm {vm_id} has no running process on this host")
        return machine

    async def attach(self, vm_id: str, owner_id: int | None, mount: Mount) -> Attachment:
        """Hot attach to a running VM (not while it is being saved)."""
        async with self._machines.save_lock(vm_id):
            return await self.participant.attach(vm_id, owner_id, self._running(vm_id), mount)

    async def detach(self, vm_id: str, volume_id: str, mount_path: str) -> None:
        """Hot detach from a running VM: the guest syncs and unmounts (VolumeBusy
        while files are open there), then the drive goes."""
        async with self._machines.save_lock(vm_id):
            await self.participant.detach(vm_id, self._running(vm_id), volume_id, mount_path)

    def attachments(self, vm_id: str) -> list[Attachment]:
        return self.volumes.attachments(vm_id)

    async def pause_and_capture(self, vm_id: str, checkpoint_id: str, *, flush: bool) -> list[SavedDrive]:
        """Right before a save of the VM (its save lock held): the guest
        paused, each volume drive's content kept as checkpoint
        ``checkpoint_id`` (see ``Volumes.pause_and_capture``)."""
        return await self.volumes.pause_and_capture(self._running(vm_id), checkpoint_id, flush=flush)

    async def resume(self, vm_id: str) -> None:
        """Continue a guest ``pause_and_capture`` paused, when no save follows."""
        with contextlib.suppress(RuntimeFailure):
            await hotplug.resume(as_handle(self._running(vm_id)).qmp)

    def check_capturable(self, vm_id: str) -> None:
        """VolumeBusy if a save of the VM could not keep what its drives hold."""
        self.volumes.check_capturable(vm_id)
