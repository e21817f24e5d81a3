"""``Volumes``: the one object the service layer and the pipeline participant
use. It holds each volume's lock around every operation and decides where
each one runs: offline on the image, through the VM that has the volume
mounted (its QMP and agent), or in a helper VM.

What it keeps is on disk (``kiln.volumes.layout``); the service layer keeps
the user's side (names, owners, quotas, which mounts a VM should have) and
calls this with ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.config import Settings
from kiln.node.participant import Mount, SavedDrive
from kiln.runtime.driver import ScsiDrive
from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import attach, chain, hotplug, images, procfs
from kiln.volumes.attach import GuestFactory, VmHandle, as_handle
from kiln.volumes.attachments import (
    ATTACHED,
    DRIVE_PREFIX,
    MOUNTED,
    Attachment,
    AttachmentStore,
    drive_id_for,
)
from kiln.volumes.errors import (
    CheckpointNotFound,
    VolumeBusy,
    VolumeError,
    VolumeNotFound,
)
from kiln.volumes.files import ByteSource, BytesSource, FileEntry, VolumeFiles
from kiln.volumes.guest import guest_volumes
from kiln.volumes.helper import HelperVms
from kiln.volumes.layout import (
    FileOwner,
    VolumeMeta,
    VolumePaths,
    allocated_bytes,
    check_id,
    open_to_vms,
    read_meta,
    top_path,
    volume_paths,
    write_meta,
)
from kiln.volumes.locks import VolumeLocks
from kiln.volumes.rawview import remove_stale_views
from kiln.volumes.tools import FsckOutcome, Identity

log = logging.getLogger(__name__)

# Where a helper VM mounts the volume it works on.
HELPER_MOUNT_PATH = "/mnt/volume"

# vm_id -> the running VM, if this host runs it (the node layer's registry).
MachineLookup = Callable[[str], object | None]


@dataclass(frozen=True)
class CheckpointInfo:
    checkpoint_id: str
    created_at: float
    size_bytes: (
        int  # what its own layer takes on the host (copy-on-write: the changes only)
    )


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


def machine_is_alive(machine: object) -> bool:
    alive = getattr(machine, "is_alive", None)
    return bool(alive()) if callable(alive) else True


class Volumes:
    def __init__(
        self,
        settings: Settings,
        *,
        machines: MachineLookup | None = None,
        helpers: HelperVms | None = None,
        guest: GuestFactory = guest_volumes,
        vm_owner: Callable[[], FileOwner] = lambda: None,
    ) -> None:
        self.settings = settings
        self.root = settings.volumes_dir
        self.store = AttachmentStore(self.root)
        self._machines = machines or (lambda vm_id: None)
        # Set once the node can start helper VMs (``kiln.node.volumes``).
        self.helpers = helpers
        self._guest = guest
        # The user a confined QEMU runs as (known once the node started).
        self._vm_owner = vm_owner
        self._locks = VolumeLocks()

    # ---- locking and where things run

    def paths(self, volume_id: str) -> VolumePaths:
        return volume_paths(self.root, volume_id)

    @property
    def tools_user(self) -> Identity:
        return Identity.of_user(self.settings.volume_tools_user)

    @contextlib.asynccontextmanager
    async def _locked(
        self, volume_id: str
    ) -> AsyncIterator[tuple[VolumePaths, VolumeMeta]]:
        """The volume's lock, and its record with anything a dead process left
        half done finished or undone."""
        paths = self.paths(volume_id)
        if not paths.meta.exists():
            raise VolumeNotFound(f"no volume {volume_id} on this host")
        async with self._locks.hold(paths.lock):
            meta = read_meta(paths)
            remove_stale_views(paths)
            await chain.recover(paths, meta)
            open_to_vms(paths, meta, self._vm_owner())
            yield paths, meta

    def _running(self, attachment: Attachment) -> VmHandle | None:
        machine = self._machines(attachment.vm_id)
        if machine is None or not machine_is_alive(machine):
            return None
        return as_handle(machine)

    def _live(self, volume_id: str) -> list[Attachment]:
        return [a for a in self.store.of_volume(volume_id) if a.live_view]

    def _require_no_live_view(
        self, paths: VolumePaths, volume_id: str, doing: str
    ) -> None:
        live = self._live(volume_id)
        if live:
            raise VolumeBusy(
                f"volume {volume_id} is mounted in {live[0].vm_id}; {doing} needs it unmounted"
            )
        if procfs.holders(paths.layers):
            raise VolumeBusy(
                f"volume {volume_id} is open in a process this host has no record of"
            )

    # ---- volumes

    async def create(self, volume_id: str, quota_bytes: int) -> VolumeInfo:
        check_id(volume_id, "volume id")
        size = images.image_size(
            quota_bytes, self.settings.volume_min_bytes, self.settings.volume_max_bytes
        )
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
                raise VolumeBusy(
                    f"volume {volume_id} is mounted in {attached[0].vm_id}"
                )
            if procfs.holders(paths.root):
                raise VolumeBusy(
                    f"volume {volume_id} is open in a process this host has no record of"
                )
            images.delete(paths)

    async def resize(self, volume_id: str, quota_bytes: int) -> VolumeInfo:
        """Grow (online through the VM that mounts it rw, or offline) or shrink
        (offline only, never below what it holds)."""
        size = images.image_size(
            quota_bytes, self.settings.volume_min_bytes, self.settings.volume_max_bytes
        )
        async with self._locked(volume_id) as (paths, meta):
            live = self._live(volume_id)
            if not live:
                self._require_no_live_view(paths, volume_id, "resizing")
                await images.resize(paths, meta, size, self.tools_user)
                return self._info(paths, meta)
            writer = next((a for a in live if not a.read_only), None)
            vm = self._running(writer) if writer is not None else None
            if writer is None or vm is None:
                raise VolumeBusy(
                    f"volume {volume_id} is mounted read-only or in a VM that is not running; "
                    "it grows online only through a running rw mount"
                )
            if size < meta.size_bytes:
                raise VolumeBusy(
                    f"volume {volume_id} is mounted in {writer.vm_id}; unmount it to shrink it"
                )
            if size == meta.size_bytes:
                return self._info(paths, meta)
            await hotplug.resize_drive(vm.qmp, writer.drive_id, size)
            meta.size_bytes = size
            write_meta(paths, meta)
            usage = await self._guest(vm.agent).grow(
                writer.drive_id, writer.mount_path, size
            )
            meta.used_bytes, meta.used_at = usage.used_bytes, time.time()
            write_meta(paths, meta)
            return self._info(paths, meta)

    async def refresh_usage(self, volume_id: str) -> VolumeInfo:
        """``used_bytes`` as the filesystem counts it now: from the guest that
        mounts it rw, else (when nothing has it) from the image's superblock,
        else (mounted ro, or in a VM that is not running) as last known."""
        async with self._locked(volume_id) as (paths, meta):
            live = self._live(volume_id)
            writer = next((a for a in live if not a.read_only), None)
            vm = self._running(writer) if writer is not None else None
            if writer is not None and vm is not None:
                usage = await self._guest(vm.agent).usage(writer.mount_path)
                meta.used_bytes, meta.used_at = usage.used_bytes, time.time()
                write_meta(paths, meta)
            elif (
                not live
                and not meta.needs_check
                and not procfs.is_held(top_path(paths, meta))
            ):
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
            allocated_bytes=sum(
                allocated_bytes(path) for path in paths.root.rglob("*.qcow2")
            ),
            checkpoints=tuple(self._checkpoints(paths, meta)),
            attachments=tuple(self.store.of_volume(meta.volume_id)),
        )

    # ---- checkpoints

    def _checkpoints(
        self, paths: VolumePaths, meta: VolumeMeta
    ) -> list[CheckpointInfo]:
        return [
            CheckpointInfo(
                layer.checkpoint_id,
                layer.created_at,
                allocated_bytes(paths.layer(layer.layer_id)),
            )
            for layer in meta.layers
            if layer.checkpoint_id is not None
        ]

    async def checkpoints(self, volume_id: str) -> list[CheckpointInfo]:
        async with self._locked(volume_id) as (paths, meta):
            return self._checkpoints(paths, meta)

    async def create_checkpoint(
        self, volume_id: str, checkpoint_id: str
    ) -> CheckpointInfo:
        """Capture the volume as it is now. Mounted rw in a running VM: its
        filesystem is frozen (the guest flushes and holds every write) while
        the drive moves onto a new top, and thawed after, whatever happens."""
        check_id(checkpoint_id, "checkpoint id")
        async with self._locked(volume_id) as (paths, meta):
            if meta.checkpoint_layer(checkpoint_id) is not None:
                raise VolumeBusy(
                    f"volume {volume_id} has a checkpoint {checkpoint_id} already"
                )
            if len(meta.layers) >= self.settings.volume_max_layers:
                if not self.store.of_volume(volume_id):
                    await chain.compact(paths, meta)
                if len(meta.layers) >= self.settings.volume_max_layers:
                    raise VolumeBusy(
                        f"volume {volume_id} has {len(meta.layers)} layers, the most it may have; delete checkpoints"
                    )
            live = self._live(volume_id)
            writer = next((a for a in live if not a.read_only), None)
            vm = self._running(writer) if writer is not None else None
            if writer is None or vm is None:
                # Offline: nothing may write the top while it is frozen. Readers
                # may read it (it keeps its content); a writer that is not
                # running (suspended) resumes onto the new top, same content.
                if procfs.is_held(top_path(paths, meta)) and (
                    writer is not None or not live
                ):
                    raise VolumeBusy(
                        f"volume {volume_id} is open in a VM this host cannot reach"
                    )
                layer = await chain.checkpoint(paths, meta, checkpoint_id, owner=self._vm_owner())
            else:
                layer = await self._checkpoint_online(
                    paths, meta, checkpoint_id, writer, vm
                )
            if writer is not None:
                # Its drive now writes the new top: a resume must open that one.
                self.store.save(
                    dataclasses.replace(writer, image=str(top_path(paths, meta)))
                )
            return CheckpointInfo(
                checkpoint_id,
                layer.created_at,
                allocated_bytes(paths.layer(layer.layer_id)),
            )

    async def _checkpoint_online(
        self,
        paths: VolumePaths,
        meta: VolumeMeta,
        checkpoint_id: str,
        writer: Attachment,
        vm: VmHandle,
    ) -> chain.Layer:
        guest = self._guest(vm.agent)
        await guest.freeze(writer.mount_path)
        try:

            async def switch(top: Path) -> None:
                await hotplug.snapshot_drive(vm.qmp, writer.drive_id, top)

            return await chain.checkpoint(paths, meta, checkpoint_id, switch, self._vm_owner())
        finally:
            await guest.thaw(writer.mount_path)

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

    async def pause_and_capture(
        self, machine: object, checkpoint_id: str, *, flush: bool = False
    ) -> list[SavedDrive]:
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
                drives = [
                    await self._capture_one(vm, *held[a.volume_id], a, checkpoint_id)
                    for a in attachments
                ]
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

        async def switch(top: Path) -> None:
            await hotplug.snapshot_drive(vm.qmp, attachment.drive_id, top)

        await chain.checkpoint(paths, meta, checkpoint_id, switch, self._vm_owner())
        self.store.save(dataclasses.replace(attachment, image=str(top_path(paths, meta))))

    async def delete_checkpoint(self, volume_id: str, checkpoint_id: str) -> None:
        """Forget a checkpoint (refused while it is mounted somewhere); its
        layer's space comes back once no VM has the volume (``compact``)."""
        async with self._locked(volume_id) as (paths, meta):
            if meta.checkpoint_layer(checkpoint_id) is None:
                raise CheckpointNotFound(
                    f"volume {volume_id} has no checkpoint {checkpoint_id}"
                )
            users = [
                a
                for a in self.store.of_volume(volume_id)
                if a.checkpoint_id == checkpoint_id
            ]
            if users:
                raise VolumeBusy(
                    f"checkpoint {checkpoint_id} is mounted in {users[0].vm_id}"
                )
            chain.forget_checkpoint(paths, meta, checkpoint_id)
            await self._compact_if_idle(paths, meta)

    async def compact(self, volume_id: str) -> int:
        """Reclaim the layers of deleted checkpoints, if no VM has the volume."""
        async with self._locked(volume_id) as (paths, meta):
            return await self._compact_if_idle(paths, meta)

    async def _compact_if_idle(self, paths: VolumePaths, meta: VolumeMeta) -> int:
        if self.store.of_volume(meta.volume_id) or procfs.holders(paths.root):
            return 0
        return await chain.compact(paths, meta)

    # ---- attachments

    def attachments(self, vm_id: str) -> list[Attachment]:
        return self.store.of_vm(vm_id)

    async def plan(
        self, vm_id: str, mount: Mount, taken_scsi_ids: set[int] | None = None
    ) -> Attachment:
        """Record ``mount`` for ``vm_id`` before its drive exists (a VM about to
        start, or a hot attach). Checks what this host can check (exclusivity,
        the checkpoint) and runs a pending filesystem check first."""
        async with self._locked(mount.volume_id) as (paths, meta):
            return await self._plan(paths, meta, vm_id, mount, taken_scsi_ids or set())

    async def _plan(
        self,
        paths: VolumePaths,
        meta: VolumeMeta,
        vm_id: str,
        mount: Mount,
        taken: set[int],
    ) -> Attachment:
        if mount.checkpoint_id is None and meta.needs_check:
            self._require_no_live_view(paths, meta.volume_id, "the check after a crash")
            log.info(
                "volume %s was in use by a VM that died: checking it first",
                meta.volume_id,
            )
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
            return await attach.plug_and_mount(
                self.store, self._guest(vm.agent), vm, attachment
            )
        except BaseException:
            if attachment.state not in (ATTACHED, MOUNTED):
                # Ours alone: nothing of it was there before this call.
                with contextlib.suppress(VolumeError, OSError):
                    await hotplug.remove_drive(vm.qmp, attachment.drive_id)
                attach.forget(self.store, attachment)
            raise

    async def mount_all(
        self, machine: object, keep: tuple[Mount, ...]
    ) -> list[Attachment]:
        """Bring the VM's drives in line with ``keep`` (its mounts): each one
        plugged and mounted (idempotent: a resumed guest has its mounts
        already; a mount without a record yet is planned now), every other
        record of the VM taken away, placeholders first (a restored snapshot's
        drives, replaced by the real mounts at the same paths)."""
        vm_id = str(getattr(machine, "vm_id", ""))
        if not keep and not self.store.of_vm(vm_id):
            return []  # nothing to do, whatever the VM's driver can plug
        vm = as_handle(machine)
        wanted = {
            drive_id_for(m.volume_id, m.mount_path, m.checkpoint_id): m for m in keep
        }
        mounted = []
        for attachment in self.store.of_vm(vm.vm_id):
            async with self._locked(attachment.volume_id) as (paths, meta):
                if attachment.drive_id in wanted and not attachment.placeholder:
                    del wanted[attachment.drive_id]
                    mounted.append(await self._plug(vm, attachment))
                else:
                    await attach.unmount_and_unplug(
                        self.store,
                        self._guest(vm.agent),
                        vm,
                        paths,
                        meta,
                        attachment,
                        force=True,
                    )
        for mount in wanted.values():
            mounted.append(await self.attach(vm, mount))
        return mounted

    async def detach(
        self, machine: object, volume_id: str, mount_path: str, *, force: bool = False
    ) -> None:
        """Hot detach: the guest syncs and unmounts (refused while files are
        open, unless ``force``), then the drive is unplugged."""
        vm = as_handle(machine)
        async with self._locked(volume_id) as (paths, meta):
            found = [
                a
                for a in self.store.of_vm(vm.vm_id)
                if a.volume_id == volume_id and a.mount_path == mount_path
            ]
            if not found:
                raise VolumeNotFound(
                    f"volume {volume_id} is not mounted at {mount_path} in {vm.vm_id}"
                )
            await attach.unmount_and_unplug(
                self.store,
                self._guest(vm.agent),
                vm,
                paths,
                meta,
                found[0],
                force=force,
            )
            await self._compact_if_idle(paths, meta)

    async def detach_all(self, machine: object, *, force: bool = True) -> None:
        vm = as_handle(machine)
        for attachment in self.store.of_vm(vm.vm_id):
            async with self._locked(attachment.volume_id) as (paths, meta):
                await attach.unmount_and_unplug(
                    self.store,
                    self._guest(vm.agent),
                    vm,
                    paths,
                    meta,
                    attachment,
                    force=force,
                )

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

    async def _release_one(
        self, paths: VolumePaths, meta: VolumeMeta, attachment: Attachment
    ) -> None:
        vm = self._running(attachment)
        if vm is not None and attachment.state in (ATTACHED, MOUNTED):
            with contextlib.suppress(VolumeError):
                await attach.unmount_and_unplug(
                    self.store,
                    self._guest(vm.agent),
                    vm,
                    paths,
                    meta,
                    attachment,
                    force=True,
                )
                return
        if attachment.writes_volume and attachment.state in (ATTACHED, MOUNTED):
            meta.needs_check = True
            write_meta(paths, meta)
        attach.forget(self.store, attachment)

    # ---- files

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
            async with self._helper_mount(paths, meta, read_only=not write) as (
                vm,
                attachment,
            ):
                yield VolumeFiles(
                    vm.agent, self._guest(vm.agent), attachment.mount_path
                )

    @contextlib.asynccontextmanager
    async def _helper_mount(
        self, paths: VolumePaths, meta: VolumeMeta, *, read_only: bool
    ) -> AsyncIterator[tuple[VmHandle, Attachment]]:
        if self.helpers is None:
            raise VolumeError(
                "host-side access to an unmounted volume needs helper VMs, and none are set up"
            )
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
                    await attach.unmount_and_unplug(
                        self.store,
                        self._guest(vm.agent),
                        vm,
                        paths,
                        meta,
                        attachment,
                        force=True,
                    )
                    unplugged = True
                    # Left as it was found: it may serve the next volume.
                    session.reusable = not any(
                        drive.startswith(DRIVE_PREFIX)
                        for drive in await hotplug.drives(vm.qmp)
                    )
                finally:
                    if not unplugged:
                        # The helper goes (its release must not wait for this
                        # volume's lock, held here); the volume is checked
                        # before its next mount if the helper wrote it.
                        if attachment.writes_volume:
                            meta.needs_check = True
                            write_meta(paths, meta)
                        attach.forget(self.store, attachment)

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

    async def delete_file(
        self, volume_id: str, path: str, *, recursive: bool = False
    ) -> None:
        async with self.files(volume_id, write=True) as files:
            await files.delete(path, recursive)

    # ---- host start and stop

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
