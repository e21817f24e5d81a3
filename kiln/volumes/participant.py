"""Volumes in the VM lifecycle pipeline (``kiln.node.participant.Participant``).

Host resources, by kind (``name`` is unique per kind on the host):

- ``volume-attachment``: a VM's drive of a volume, ``<vm_id>/<drive_id>``;
  it exists on the host as the record ``volumes/<volume>/attachments/<vm>.<drive>.json``.
- ``volume-layer``: the throwaway top of a rw checkpoint mount, named by its
  path ``volumes/<volume>/scratch/<vm>.<drive>.qcow2``.
- ``volume-helper``: a helper VM's run dir (``vms/volh-*``), which only a
  process that died mid-session leaves behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.node.participant import HostResource, Launch, Ledger, Mount, VmContext
from kiln.runtime.driver import Machine
from kiln.volumes.attachments import drive_id_for
from kiln.volumes.helper import HelperVms, is_helper
from kiln.volumes.volumes import Volumes

log = logging.getLogger(__name__)

ATTACHMENT_KIND = "volume-attachment"
LAYER_KIND = "volume-layer"
HELPER_KIND = "volume-helper"


class VolumeParticipant:
    name = "volumes"
    kinds = frozenset({ATTACHMENT_KIND, LAYER_KIND, HELPER_KIND})

    def __init__(self, volumes: Volumes, helpers: HelperVms | None = None) -> None:
        self.volumes = volumes
        self.helpers = helpers

    def _resources(self, vm: VmContext, mount: Mount) -> list[HostResource]:
        drive_id = drive_id_for(mount.volume_id, mount.mount_path, mount.checkpoint_id)
        detail = {
            "volume_id": mount.volume_id,
            "mount_path": mount.mount_path,
            "read_only": mount.read_only,
            "checkpoint_id": mount.checkpoint_id,
            "drive_id": drive_id,
        }
        resources = [
            HostResource(
                ATTACHMENT_KIND, f"{vm.vm_id}/{drive_id}", vm.vm_id, vm.owner_id, detail
            )
        ]
        if mount.checkpoint_id is not None and not mount.read_only:
            scratch = self.volumes.paths(mount.volume_id).scratch(vm.vm_id, drive_id)
            resources.append(
                HostResource(LAYER_KIND, str(scratch), vm.vm_id, vm.owner_id, detail)
            )
        return resources

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        """Record and plan each mount (checks, a throwaway top for a rw
        checkpoint mount, the check of a volume a dead VM left). A cold boot
        starts with every drive on its command line; a restore with exactly the
        drives its saved state had (a resumed VM's own): ``ready`` plugs the rest."""
        for mount in vm.mounts:
            for resource in self._resources(vm, mount):
                await ledger.record(resource)
            await self.volumes.plan(vm.vm_id, mount)
        restoring = vm.restore_from is not None
        launch.scsi_drives.extend(
            self.volumes.drives_at_start(vm.vm_id, restoring=restoring)
        )

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        """Every mount plugged (hot, unless the VM has the drive already) and
        mounted in the guest; a restored guest that had a mount at its save
        keeps it (the mount is checked, and made again if it is missing)."""
        await self.volumes.mount_all(machine, vm.mounts)

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        """A pool VM (no volumes) becomes ``vm``: hot-attach its mounts.
        There is no ledger here: the attachment records on disk are what
        ``release`` and ``inventory`` go by."""
        for mount in vm.mounts:
            await self.volumes.attach(machine, mount)

    async def release(
        self, vm_id: str, resources: list[HostResource], ledger: Ledger
    ) -> None:
        """Unmount cleanly if the VM still runs, otherwise mark what it had
        mounted rw for a check; drop its records and throwaway tops; stop a
        helper VM left behind. Idempotent."""
        if self.helpers is not None and is_helper(vm_id):
            await self.helpers.destroy(vm_id)
        await self.volumes.release(vm_id)
        for resource in resources:
            if resource.kind == LAYER_KIND:
                scratch = Path(resource.name)
                if (
                    scratch.is_relative_to(self.volumes.root.resolve())
                    and scratch.suffix == ".qcow2"
                ):
                    scratch.unlink(missing_ok=True)
            if resource.kind == HELPER_KIND and self.helpers is not None:
                await self.helpers.destroy(resource.vm_id)
            if resource.kind in self.kinds:
                await ledger.forget(resource)

    async def inventory(self) -> list[HostResource]:
        busy = self.helpers.active if self.helpers is not None else set()
        found = []
        for attachment in self.volumes.store.all():
            if attachment.vm_id in busy:
                continue
            found.append(
                HostResource(
                    ATTACHMENT_KIND,
                    f"{attachment.vm_id}/{attachment.drive_id}",
                    attachment.vm_id,
                    detail={
                        "volume_id": attachment.volume_id,
                        "mount_path": attachment.mount_path,
                    },
                )
            )
        for scratch in self.volumes.root.glob("*/scratch/*.qcow2"):
            vm_id = scratch.name.split(".", 1)[0]
            if vm_id not in busy:
                found.append(HostResource(LAYER_KIND, str(scratch), vm_id))
        if self.helpers is not None:
            for vm_id, run_dir in self.helpers.leftovers():
                if vm_id not in busy:
                    found.append(HostResource(HELPER_KIND, str(run_dir), vm_id))
        return found
