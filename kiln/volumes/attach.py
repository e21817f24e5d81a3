"""Attaching a volume to a VM and taking it away again (the steps; ``Volumes``
holds the volume's lock around them).

Plan (before the VM runs, or before a hot attach): check the rules this host
can check (one live rw attachment of a volume, or live ro ones only; a
checkpoint mount needs neither), pick the file the drive opens and a free SCSI
target, make a throwaway top for a rw checkpoint mount, write the record.

Plug and mount (a running VM): ``blockdev-add`` + ``device_add`` unless the VM
has the drive already (it was on its command line), then the guest mounts it.

Unmount and unplug: the guest syncs, unmounts and deletes its SCSI disk, then
``device_del`` + ``blockdev-del``; the record and the throwaway top go.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kiln.node.participant import Mount, SavedDrive
from kiln.runtime.driver import ScsiDrive
from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import chain, hotplug, procfs
from kiln.volumes.attachments import (
    ATTACHED,
    MOUNTED,
    Attachment,
    AttachmentStore,
    check_mount_path,
    drive_id_for,
)
from kiln.volumes.errors import (
    CheckpointNotFound,
    GuestVolumeError,
    VolumeBusy,
    VolumeError,
)
from kiln.volumes.guest import Agent, GuestVolumes
from kiln.volumes.hotplug import Qmp
from kiln.volumes.layout import FileOwner, VolumeMeta, VolumePaths, check_id, top_path, write_meta

log = logging.getLogger(__name__)


class VmHandle(Protocol):
    """A running VM as this package uses it: its agent and its QMP
    (``kiln.runtime.qemu.QemuMachine`` is one)."""

    @property
    def vm_id(self) -> str: ...

    @property
    def agent(self) -> Agent: ...

    @property
    def qmp(self) -> Qmp: ...


def as_handle(machine: object) -> VmHandle:
    if not all(hasattr(machine, name) for name in ("vm_id", "agent", "qmp")):
        raise VolumeError(
            f"{type(machine).__name__} has no QMP: this driver cannot hot-plug volumes"
        )
    return machine  # type: ignore[return-value]


GuestFactory = Callable[[Agent], GuestVolumes]


async def plan(
    store: AttachmentStore,
    paths: VolumePaths,
    meta: VolumeMeta,
    vm_id: str,
    mount: Mount,
    taken_scsi_ids: set[int],
    owner: FileOwner = None,
) -> Attachment:
    """The attachment record of ``mount`` on ``vm_id``, written (state planned);
    the same record again if it exists already. ``owner``: whose a throwaway
    top is (the user a confined QEMU runs as)."""
    check_id(vm_id, "vm id")
    mount_path = check_mount_path(mount.mount_path)
    drive_id = drive_id_for(mount.volume_id, mount_path, mount.checkpoint_id)
    existing = store.of_volume(mount.volume_id)
    for other in existing:
        if other.vm_id == vm_id and other.drive_id == drive_id:
            if other.placeholder:
                raise VolumeBusy(f"{mount_path} on {vm_id} still has the drive it was saved with")
            if other.read_only != mount.read_only:
                raise VolumeBusy(
                    f"{mount_path} on {vm_id} is attached {'ro' if other.read_only else 'rw'} already"
                )
            return other
    for other in store.of_vm(vm_id):
        if other.mount_path == mount_path:
            raise VolumeBusy(f"{vm_id} has another volume at {mount_path}")
    if mount.checkpoint_id is None:
        check_exclusive(existing, mount)
    scsi_id = hotplug.free_scsi_id(
        taken_scsi_ids | {a.scsi_id for a in store.of_vm(vm_id)}
    )
    scratch = False
    if mount.checkpoint_id is None:
        image = top_path(paths, meta)
        if not mount.read_only and procfs.is_held(image):
            raise VolumeBusy(
                f"volume {mount.volume_id} is open in a process this host has no record of"
            )
    else:
        layer = meta.checkpoint_layer(check_id(mount.checkpoint_id, "checkpoint id"))
        if layer is None:
            raise CheckpointNotFound(
                f"volume {mount.volume_id} has no checkpoint {mount.checkpoint_id}"
            )
        if mount.read_only:
            image = paths.layer(layer.layer_id)
        else:
            image = await chain.make_scratch(paths, layer.layer_id, vm_id, drive_id, owner)
            scratch = True
    attachment = Attachment(
        vm_id=vm_id,
        drive_id=drive_id,
        volume_id=mount.volume_id,
        mount_path=mount_path,
        read_only=mount.read_only,
        checkpoint_id=mount.checkpoint_id,
        scsi_id=scsi_id,
        image=str(image),
        scratch=scratch,
    )
    store.save(attachment)
    return attachment


async def plan_saved(
    store: AttachmentStore,
    paths: VolumePaths,
    meta: VolumeMeta,
    vm_id: str,
    drive: SavedDrive,
    owner: FileOwner = None,
) -> Attachment:
    """The placeholder record of a drive ``vm_id``'s saved state has (state
    mounted: the saved guest has it mounted): the drive's content at the save,
    read-only as it was, or under a throwaway top for a writable drive."""
    check_id(vm_id, "vm id")
    for other in store.of_vm(vm_id):
        if other.drive_id == drive.drive_id:
            return other
    layer = meta.checkpoint_layer(check_id(drive.source_checkpoint_id, "checkpoint id"))
    if layer is None:
        raise CheckpointNotFound(
            f"volume {drive.volume_id} no longer has what {drive.mount_path} held when the VM "
            f"was saved (checkpoint {drive.source_checkpoint_id})"
        )
    if drive.read_only:
        image = paths.layer(layer.layer_id)
    else:
        image = await chain.make_scratch(paths, layer.layer_id, vm_id, drive.drive_id, owner)
    attachment = Attachment(
        vm_id=vm_id,
        drive_id=drive.drive_id,
        volume_id=drive.volume_id,
        mount_path=drive.mount_path,
        read_only=drive.read_only,
        checkpoint_id=drive.source_checkpoint_id,
        scsi_id=drive.scsi_id,
        image=str(image),
        scratch=not drive.read_only,
        state=MOUNTED,
        placeholder=True,
    )
    store.save(attachment)
    return attachment


def check_exclusive(existing: list[Attachment], mount: Mount) -> None:
    """One rw mount of the volume as it is now, or any number of ro ones."""
    live = [a for a in existing if a.live_view]
    writers = [a for a in live if not a.read_only]
    if not mount.read_only and live:
        holder = live[0]
        raise VolumeBusy(
            f"volume {mount.volume_id} is mounted {'ro' if holder.read_only else 'rw'} "
            f"in {holder.vm_id}; a rw mount needs it mounted nowhere else"
        )
    if mount.read_only and writers:
        raise VolumeBusy(
            f"volume {mount.volume_id} is mounted rw in {writers[0].vm_id}"
        )


async def plug_and_mount(
    store: AttachmentStore, guest: GuestVolumes, vm: VmHandle, attachment: Attachment
) -> Attachment:
    """Make the planned (or already attached) drive mounted in the guest."""
    if attachment.drive_id not in await hotplug.drives(vm.qmp):
        await hotplug.add_drive(
            vm.qmp, attachment.drive_id, Path(attachment.image),
            read_only=attachment.read_only, scsi_id=attachment.scsi_id,
        )  # fmt: skip
    attachment = (
        attachment.with_state(ATTACHED) if attachment.state != MOUNTED else attachment
    )
    store.save(attachment)
    await guest.mount(attachment.drive_id, attachment.mount_path, attachment.read_only)
    attachment = attachment.with_state(MOUNTED)
    store.save(attachment)
    return attachment


async def unmount_and_unplug(
    store: AttachmentStore,
    guest: GuestVolumes,
    vm: VmHandle,
    paths: VolumePaths,
    meta: VolumeMeta,
    attachment: Attachment,
    *,
    force: bool,
) -> None:
    """The guest lets go (sync, unmount, delete its disk), the host unplugs
    the drive, and the record and any throwaway top go. Without ``force`` a
    busy mount (open files) is refused and nothing changes; with it the
    unmount is lazy, and a guest that cannot answer does not stop the unplug
    (the volume is then checked before its next mount)."""
    clean = True
    if attachment.writes_volume:
        with contextlib.suppress(VolumeError):
            usage = await guest.usage(attachment.mount_path)
            meta.used_bytes = usage.used_bytes
    try:
        await guest.umount(
            attachment.mount_path, serial=attachment.drive_id, force=force
        )
    except GuestVolumeError as error:
        if not force:
            if error.code == "EBUSY":
                raise VolumeBusy(
                    f"{attachment.mount_path} is busy in {vm.vm_id}: {error.message}"
                ) from error
            raise
        log.warning(
            "VM %s did not unmount %s cleanly: %s",
            vm.vm_id,
            attachment.mount_path,
            error,
        )
        clean = False
    try:
        await hotplug.remove_drive(vm.qmp, attachment.drive_id)
    except RuntimeFailure as error:
        if not force:
            raise
        log.warning("VM %s: cannot unplug %s: %s", vm.vm_id, attachment.drive_id, error)
        clean = False
    if attachment.writes_volume and not clean:
        meta.needs_check = True
    write_meta(paths, meta)
    forget(store, attachment)


def forget(store: AttachmentStore, attachment: Attachment) -> None:
    """Drop the record, and the throwaway top it made."""
    if attachment.scratch:
        Path(attachment.image).unlink(missing_ok=True)
    store.remove(attachment)


def start_drive(attachment: Attachment) -> ScsiDrive:
    """The drive as the VM's command line gets it, at the SCSI target it had
    when the VM was saved."""
    return ScsiDrive(
        drive_id=attachment.drive_id,
        path=Path(attachment.image),
        read_only=attachment.read_only,
        image_format="qcow2",
        scsi_id=attachment.scsi_id,
    )


def drives_at_start(
    attachments: list[Attachment], *, restoring: bool
) -> list[ScsiDrive]:
    """The drives a VM's process starts with. A cold boot starts with all
    of its planned attachments; a restore with exactly those its saved
    state had (attached or mounted when it was saved): any other drive the
    ``ready`` hook hot-plugs."""
    chosen = sorted(
        (a for a in attachments if not restoring or a.state in (ATTACHED, MOUNTED)),
        key=lambda a: a.scsi_id,
    )
    return [start_drive(a) for a in chosen]
