"""Volumes mounted in VMs: the rows (``volume_mounts``), the rules, and the
hot attach and detach of a running VM.

A mount row exists from the moment a create (or a hot attach) is admitted
until the VM ends or the volume is unmounted; the rules (``rules.py``) are
checked against the rows of every VM that holds drives, under the volume
row's lock (``VolumeRepository.lock``), in the same transaction that inserts
the new row: two creates or attaches of one volume never both pass. The host
(``kiln.volumes``) checks the same rules again on its own records.

Statuses: ``attaching`` (admitted; the VM is being made, or the drive being
plugged), ``mounted``, ``detaching``, ``failed`` (a background attach that
did not work: ``failure_reason``; it holds nothing and goes with an unmount).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.node.node import Node
from kiln.node.participant import Mount, SavedDrive
from kiln.services.background import BackgroundTasks
from kiln.services.errors import Conflict, FieldProblem, InvalidRequest, NotFound, ServiceError
from kiln.services.events.record import by_user, mount_event, record
from kiln.services.states import STATES_WITH_A_DISK, VmStatus
from kiln.services.volumes.errors import volume_errors
from kiln.services.volumes.rules import MountRequest, as_mount, conflict, mount_problems
from kiln.store.db import Database
from kiln.store.models import Vm, VolumeMount
from kiln.store.repositories import VmRepository
from kiln.store.volume_repositories import CheckpointRepository, MountRepository, VolumeRepository

log = logging.getLogger(__name__)

ATTACHING = "attaching"
MOUNTED = "mounted"
DETACHING = "detaching"
FAILED = "failed"
# Mounts of VMs in these states hold their volume (a suspended VM's saved
# devices have its drives; a VM being made or saved will have them).
HOLDING_STATES = STATES_WITH_A_DISK


@dataclass(frozen=True)
class MountPlan:
    """The mounts a new VM starts with, and the saved drives its snapshot had."""

    mounts: tuple[Mount, ...] = ()
    saved_drives: tuple[SavedDrive, ...] = ()


def _held(rows: Sequence[VolumeMount]) -> list[VolumeMount]:
    return [row for row in rows if row.status != FAILED]


def vm_mounts(vm: Vm) -> tuple[Mount, ...]:
    """What the VM should have mounted (its rows that hold a drive)."""
    return tuple(as_mount(m.volume_id, m.mount_path, m.mode, m.checkpoint_id) for m in _held(vm.mounts))


class VolumeMounts:
    def __init__(self, db: Database, node: Node, background: BackgroundTasks) -> None:
        self._db = db
        self._node = node
        self._background = background

    # -- a new VM's mounts ------------------------------------------------------------

    async def plan(
        self,
        owner_id: int,
        requested: Sequence[MountRequest] | None,
        snapshot_id: str | None = None,
        saved: Sequence[dict[str, Any]] = (),
    ) -> MountPlan:
        """The mounts of a create (``volumes``) and of the snapshot it restores
        (``saved``: its drives). 422 for a bad path or mode, 404 for a volume or
        checkpoint that is not the owner's, 409 for a volume that is busy or a
        snapshot whose volumes are gone."""
        drives = tuple(SavedDrive(**drive) for drive in saved)
        problems: list[FieldProblem] = []
        taken = {drive.mount_path for drive in drives}
        mounts = [drive.mount for drive in drives]
        # Paths and modes were checked with the rest of the request (vm_policy).
        for index, request in enumerate(requested or ()):
            if request.mount_path in taken:
                problems.append(
                    FieldProblem(("volumes", index, "mount_path"), f"{request.mount_path} is mounted already")
                )
            taken.add(request.mount_path)
            mounts.append(as_mount(request.volume_id, request.mount_path, request.mode, request.checkpoint_id))
        if problems:
            raise InvalidRequest(problems)
        async with self._db.transaction() as session:
            for index, mount in enumerate(mounts):
                saved_drive = drives[index] if index < len(drives) else None
                await self._check(session, owner_id, mount, snapshot_id if saved_drive else None)
                if saved_drive is not None and saved_drive.source_checkpoint_id != mount.checkpoint_id:
                    await self._check_captured(saved_drive, snapshot_id)
        return MountPlan(tuple(mounts), drives)

    async def record(self, session: AsyncSession, owner_id: int, vm_id: str, plan: MountPlan) -> None:
        """Insert the new VM's mount rows (in its admission's transaction),
        each checked again under its volume's lock."""
        for mount in sorted(plan.mounts, key=lambda m: m.volume_id):
            await self._check(session, owner_id, mount, None, lock=True)
            await MountRepository(session).add(self._row(owner_id, vm_id, mount))

    async def vm_running(self, vm_id: str) -> None:
        """The VM is up with its mounts: they are ``mounted``."""
        async with self._db.transaction() as session:
            for row in await MountRepository(session).set_vm_status_any_owner(vm_id, ATTACHING, MOUNTED):
                await record(session, mount_event(row, "volume.attached"))

    async def vm_ended(self, vm_id: str) -> None:
        """The VM is gone (its drives released): its mounts hold nothing any more."""
        async with self._db.transaction() as session:
            for row in await MountRepository(session).delete_of_vm_any_owner(vm_id):
                if row.status != FAILED:  # a failed attach held nothing to detach
                    await record(session, mount_event(row, "volume.detached", payload={"reason": "the VM ended"}))

    # -- a running VM ----------------------------------------------------------------

    async def list(self, owner_id: int, vm_id: str) -> list[VolumeMount]:
        async with self._db.transaction() as session:
            await self._vm(session, owner_id, vm_id)
            return await MountRepository(session).of_vm(owner_id, vm_id)

    async def mount(self, owner_id: int, vm_id: str, request: MountRequest, wait: bool) -> VolumeMount:
        """Hot attach to a running VM. Waited for: the answer comes once the
        guest has it mounted (an attach that fails leaves no row); else at
        once, ``attaching`` (``failed`` with the reason if it does not work)."""
        problems = mount_problems((), request.mount_path, request.mode)
        if problems:
            raise InvalidRequest(problems)
        mount = as_mount(request.volume_id, request.mount_path, request.mode, request.checkpoint_id)
        async with self._db.transaction() as session:
            vm = await self._vm(session, owner_id, vm_id)
            if vm.status != VmStatus.RUNNING or self._node.machine(vm_id) is None:
                raise Conflict(f"vm {vm_id} is {vm.status}; volumes are attached to a running VM")
            if any(m.mount_path == mount.mount_path for m in vm.mounts):
                raise Conflict(f"vm {vm_id} has a volume at {mount.mount_path} already")
            await self._check(session, owner_id, mount, None, lock=True)
            row = await MountRepository(session).add(self._row(owner_id, vm_id, mount))
        task = self._background.run(self._attach(row, mount), f"attach {mount.volume_id} to {vm_id}")
        if not wait:
            return row
        try:
            await asyncio.shield(task)
        except Exception:
            async with self._db.transaction() as session:
                await MountRepository(session).delete_any_owner(row.id)
            raise
        return await self._reload(owner_id, vm_id, row.id)

    async def unmount(
        self, owner_id: int, vm_id: str, volume_id: str, mount_path: str | None, wait: bool
    ) -> None:
        """Hot detach: the guest syncs and unmounts (409 while files are open
        there), then the drive goes. Waited for, or in the background."""
        async with self._db.transaction() as session:
            vm = await self._vm(session, owner_id, vm_id)
            rows = [
                m for m in vm.mounts
                if m.volume_id == volume_id and (mount_path is None or m.mount_path == mount_path)
            ]  # fmt: skip
            if not rows:
                where = f" at {mount_path}" if mount_path else ""
                raise NotFound(f"volume {volume_id} is not mounted in vm {vm_id}{where}")
            if len(rows) > 1:
                paths = ", ".join(m.mount_path for m in rows)
                raise Conflict(f"volume {volume_id} is mounted at {paths} in vm {vm_id}; give mount_path")
            row = rows[0]
            if row.status == FAILED:
                await MountRepository(session).delete_any_owner(row.id)
                return
            if row.status != MOUNTED or vm.status != VmStatus.RUNNING:
                raise Conflict(
                    f"volume {volume_id} in vm {vm_id} is {row.status} and the VM {vm.status}; "
                    "a volume is detached from a running VM once it is mounted"
                )
            await MountRepository(session).set_status_any_owner(row.id, DETACHING)
        task = self._background.run(self._detach(row), f"detach {volume_id} from {vm_id}")
        if wait:
            await asyncio.shield(task)

    async def check_clone(self, owner_id: int, vm_id: str) -> None:
        """409 if a clone of the VM could not mount what it mounts (a rw mount
        of a volume is exclusive, and the source keeps its own)."""
        async with self._db.transaction() as session:
            vm = await self._vm(session, owner_id, vm_id)
        writer = next((m for m in _held(vm.mounts) if m.mode == "rw" and m.checkpoint_id is None), None)
        if writer is not None:
            raise Conflict(
                f"vm {vm_id} mounts volume {writer.volume_id} rw at {writer.mount_path}, and a rw mount "
                "is exclusive: a clone could not mount it while the VM does; unmount it (or mount it "
                "ro) first, or snapshot the VM and restore the snapshot once the VM is gone"
            )

    async def settle(self) -> None:
        """After a restart: mounts an attach or detach left half way take the
        state of the host's drives."""
        async with self._db.transaction() as session:
            vms = await VmRepository(session).list_any_owner(HOLDING_STATES)
        volumes = self._node.volumes
        for vm in vms:
            attached = {(a.volume_id, a.mount_path) for a in volumes.attachments(vm.id)} if volumes else set()
            for row in vm.mounts:
                if row.status not in (ATTACHING, DETACHING) or vm.status == VmStatus.CREATING:
                    continue
                async with self._db.transaction() as session:
                    if (row.volume_id, row.mount_path) in attached:
                        await MountRepository(session).set_status_any_owner(row.id, MOUNTED)
                    else:
                        await MountRepository(session).delete_any_owner(row.id)

    # -- internals -------------------------------------------------------------------

    async def _attach(self, row: VolumeMount, mount: Mount) -> None:
        volumes = self._require_volumes()
        try:
            with volume_errors():
                await volumes.attach(row.vm_id, row.owner_id, mount)
        except Exception as error:
            reason = str(error) or type(error).__name__
            log.warning("attaching %s to %s failed: %s", mount.volume_id, row.vm_id, reason)
            async with self._db.transaction() as session:
                await MountRepository(session).set_status_any_owner(row.id, FAILED, reason)
                await record(session, mount_event(row, "volume.attached", status="failure", error_message=reason))
            raise
        async with self._db.transaction() as session:
            await MountRepository(session).set_status_any_owner(row.id, MOUNTED)
            await record(session, mount_event(row, "volume.attached", **by_user(row.owner_id)))

    async def _detach(self, row: VolumeMount) -> None:
        volumes = self._require_volumes()
        try:
            with volume_errors():
                await volumes.detach(row.vm_id, row.volume_id, row.mount_path)
        except Exception as error:
            reason = str(error) or type(error).__name__
            async with self._db.transaction() as session:
                await MountRepository(session).set_status_any_owner(row.id, MOUNTED)
                await record(session, mount_event(row, "volume.detached", status="failure", error_message=reason))
            raise
        async with self._db.transaction() as session:
            await MountRepository(session).delete_any_owner(row.id)
            await record(session, mount_event(row, "volume.detached", **by_user(row.owner_id)))

    def _require_volumes(self) -> Any:
        if self._node.volumes is None:
            raise ServiceError("this node has no volumes")
        return self._node.volumes

    async def _vm(self, session: AsyncSession, owner_id: int, vm_id: str) -> Vm:
        vm = await VmRepository(session).get(owner_id, vm_id)
        if vm is None:
            raise NotFound(f"vm {vm_id} not found")
        return vm

    async def _reload(self, owner_id: int, vm_id: str, mount_id: int) -> VolumeMount:
        for row in await self.list(owner_id, vm_id):
            if row.id == mount_id:
                return row
        raise NotFound(f"the mount of vm {vm_id} is gone")

    async def _check(
        self, session: AsyncSession, owner_id: int, mount: Mount, snapshot_id: str | None, *, lock: bool = False
    ) -> None:
        volumes = VolumeRepository(session)
        volume = await (volumes.lock if lock else volumes.get)(owner_id, mount.volume_id)
        if volume is None:
            if snapshot_id is not None:
                raise Conflict(
                    f"snapshot {snapshot_id} was saved with volume {mount.volume_id} mounted at "
                    f"{mount.mount_path}, and that volume is gone"
                )
            raise NotFound(f"volume {mount.volume_id} not found")
        if mount.checkpoint_id is not None:
            checkpoint = await CheckpointRepository(session).get(owner_id, mount.volume_id, mount.checkpoint_id)
            if checkpoint is None:
                if snapshot_id is not None:
                    raise Conflict(
                        f"snapshot {snapshot_id} was saved with checkpoint {mount.checkpoint_id} of volume "
                        f"{mount.volume_id} mounted at {mount.mount_path}, and that checkpoint is gone"
                    )
                raise NotFound(f"volume {mount.volume_id} has no checkpoint {mount.checkpoint_id}")
        others = _held(await MountRepository(session).of_volume(owner_id, mount.volume_id, HOLDING_STATES))
        reason = conflict(mount, others)
        if reason is not None:
            raise Conflict(reason)

    async def _check_captured(self, drive: SavedDrive, snapshot_id: str | None) -> None:
        """The content a saved drive had must still be there (kept with the snapshot)."""
        volumes = self._require_volumes()
        with volume_errors():
            present = {c.checkpoint_id for c in await volumes.volumes.checkpoints(drive.volume_id)}
        if drive.source_checkpoint_id not in present:
            raise Conflict(
                f"snapshot {snapshot_id} cannot be restored: volume {drive.volume_id} no longer holds what "
                f"{drive.mount_path} held when it was saved"
            )

    @staticmethod
    def _row(owner_id: int, vm_id: str, mount: Mount) -> VolumeMount:
        return VolumeMount(
            vm_id=vm_id,
            owner_id=owner_id,
            volume_id=mount.volume_id,
            mount_path=mount.mount_path,
            mode="ro" if mount.read_only else "rw",
            checkpoint_id=mount.checkpoint_id,
            status=ATTACHING,
        )
