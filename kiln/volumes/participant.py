"""Volumes in the VM lifecycle pipeline (``kiln.node.participant.Participant``).

Host resources, by kind (``name`` is unique per kind on the host):

- ``volume-attachment``: a VM's drive of a volume, ``<vm_id>/<drive_id>``;
  it exists on the host as the record ``volumes/<volume>/attachments/<vm>.<drive>.json``.
- ``volume-layer``: a throwaway top (of a rw checkpoint mount, or of a
  restored drive's placeholder), named by its path
  ``volumes/<volume>/scratch/<vm>.<drive>.qcow2``.

Every attachment is in the ledger, whichever way it came (a create's mounts,
a pool claim, a hot attach through ``attach``), recorded before its record
and drive exist; after each change the ledger is settled with what the
records say (``_settle``), so the reconciler never sees a mounted drive as
stray nor a detached one as missing. A suspended VM keeps its attachments
(``kept_while_suspended``): its saved devices hold the drives, and its resume
restores with exactly them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.node.participant import HostResource, Launch, Ledger, Mount, VmContext
from kiln.runtime.driver import Machine
from kiln.volumes.attachments import Attachment, drive_id_for
from kiln.volumes.volumes import Volumes

log = logging.getLogger(__name__)

ATTACHMENT_KIND = "volume-attachment"
LAYER_KIND = "volume-layer"


class VolumeParticipant:
    name = "volumes"
    kinds = frozenset({ATTACHMENT_KIND, LAYER_KIND})
    kept_while_suspended = True

    def __init__(self, volumes: Volumes, ledger: Ledger) -> None:
        self.volumes = volumes
        self.ledger = ledger

    # ---- the ledger's rows of a drive

    def _rows(
        self, vm_id: str, owner_id: int | None, volume_id: str, drive_id: str, mount_path: str, scratch: bool
    ) -> list[HostResource]:
        detail = {"volume_id": volume_id, "mount_path": mount_path, "drive_id": drive_id}
        rows = [HostResource(ATTACHMENT_KIND, f"{vm_id}/{drive_id}", vm_id, owner_id, detail)]
        if scratch:
            path = self.volumes.paths(volume_id).scratch(vm_id, drive_id)
            rows.append(HostResource(LAYER_KIND, str(path), vm_id, owner_id, detail))
        return rows

    def _mount_rows(self, vm_id: str, owner_id: int | None, mount: Mount) -> list[HostResource]:
        drive_id = drive_id_for(mount.volume_id, mount.mount_path, mount.checkpoint_id)
        scratch = mount.checkpoint_id is not None and not mount.read_only
        return self._rows(vm_id, owner_id, mount.volume_id, drive_id, mount.mount_path, scratch)

    def _attachment_rows(self, owner_id: int | None, attachment: Attachment) -> list[HostResource]:
        return self._rows(
            attachment.vm_id, owner_id, attachment.volume_id, attachment.drive_id,
            attachment.mount_path, attachment.scratch,
        )  # fmt: skip

    async def _settle(self, vm_id: str) -> None:
        """Forget the rows of the VM's drives that are gone (a detach, a
        placeholder swapped, a failed attach); the rows of those that remain
        were recorded before they were made."""
        existing = {
            (row.kind, row.name)
            for attachment in self.volumes.attachments(vm_id)
            for row in self._attachment_rows(None, attachment)
        }
        gone = [
            row for row in await self.ledger.of_vm(vm_id)
            if row.kind in self.kinds and (row.kind, row.name) not in existing
        ]  # fmt: skip
        await self.ledger.forget(*gone)

    # ---- the hooks

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        """Record and plan each mount (checks, a throwaway top for a rw
        checkpoint mount, the check of a volume a dead VM left) and each
        placeholder of a restored snapshot's drives. A cold boot starts with
        every drive on its command line; a restore with exactly the drives its
        saved state had (a resumed VM's own, or the placeholders): ``ready``
        plugs the rest."""
        for drive in vm.saved_drives:
            await ledger.record(
                *self._rows(vm.vm_id, vm.owner_id, drive.volume_id, drive.drive_id, drive.mount_path,
                            not drive.read_only)
            )  # fmt: skip
            await self.volumes.plan_saved(vm.vm_id, drive)
        placeholders = {drive.drive_id for drive in vm.saved_drives}
        for mount in vm.mounts:
            await ledger.record(*self._mount_rows(vm.vm_id, vm.owner_id, mount))
            if drive_id_for(mount.volume_id, mount.mount_path, mount.checkpoint_id) not in placeholders:
                # A placeholder's mount is planned once the placeholder is gone (ready).
                await self.volumes.plan(vm.vm_id, mount)
        launch.scsi_drives.extend(
            self.volumes.drives_at_start(vm.vm_id, restoring=vm.restore_from is not None)
        )

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        """Placeholders out, then every mount plugged (hot, unless the VM has
        the drive already) and mounted in the guest; a resumed guest that had a
        mount at its save keeps it (the mount is checked, and made again if it
        is missing)."""
        try:
            await self.volumes.mount_all(machine, vm.mounts)
        finally:
            await self._settle(vm.vm_id)

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        """A pool VM (no volumes) becomes ``vm``: hot-attach its mounts."""
        for mount in vm.mounts:
            await self.attach(vm.vm_id, vm.owner_id, machine, mount)

    async def attach(self, vm_id: str, owner_id: int | None, machine: Machine, mount: Mount) -> Attachment:
        """Hot attach to a running VM: its rows first, then the drive and the guest's mount."""
        await self.ledger.record(*self._mount_rows(vm_id, owner_id, mount))
        try:
            return await self.volumes.attach(machine, mount)
        finally:
            await self._settle(vm_id)

    async def detach(self, vm_id: str, machine: Machine, volume_id: str, mount_path: str) -> None:
        """Hot detach from a running VM (the guest syncs and unmounts first)."""
        try:
            await self.volumes.detach(machine, volume_id, mount_path)
        finally:
            await self._settle(vm_id)

    async def release(self, vm_id: str, resources: list[HostResource], ledger: Ledger) -> None:
        """For each drive ``resources`` name: unmount cleanly if the VM still
        runs, otherwise mark what it had mounted rw for a check; drop its
        record and throwaway top. Only what is named: the reconciler hands
        over what it found stray, never the VM's other drives. Idempotent."""
        drives = {
            resource.name.split("/", 1)[1]
            for resource in resources
            if resource.kind == ATTACHMENT_KIND and "/" in resource.name
        }
        await self.volumes.release(vm_id, drives)
        for resource in resources:
            if resource.kind == LAYER_KIND:
                scratch = Path(resource.name)
                if scratch.is_relative_to(self.volumes.root.resolve()) and scratch.suffix == ".qcow2":
                    scratch.unlink(missing_ok=True)
        await ledger.forget(*[resource for resource in resources if resource.kind in self.kinds])

    async def inventory(self) -> list[HostResource]:
        # A helper VM's drive lives only inside one files request, under its
        # volume's lock: never stray while the helper is in use.
        helpers = self.volumes.helpers
        busy = helpers.active if helpers is not None else set()
        found = [
            row
            for attachment in self.volumes.store.all()
            if attachment.vm_id not in busy
            for row in self._attachment_rows(None, attachment)
            if row.kind == ATTACHMENT_KIND
        ]
        for scratch in self.volumes.store.volumes_dir.glob("*/scratch/*.qcow2"):
            vm_id = scratch.name.split(".", 1)[0]
            if vm_id not in busy:
                found.append(HostResource(LAYER_KIND, str(scratch), vm_id))
        return found
