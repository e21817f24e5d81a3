"""Snapshots: saving VMs into them, listing and deleting them, and settling a
save a crash of the server cut short.

A snapshot is a row (``kiln.store.models.Snapshot``) plus a directory the
runtime saved a VM into. Types (``kiln.services.states.SnapshotType``):
``user`` (``POST /v1/vms/{id}/snapshot`` and clones; the VM keeps running),
``auto`` (taken when a VM with ``snapshot_on_terminate`` is terminated),
``base`` (an image booted once and saved; no owner, visible to every user,
deletable by none through the API), ``system`` (published by the operator,
``kiln.services.snapshots.system``; no owner, visible to and usable by every
user, read-only to them), ``suspend`` (a suspended VM's saved state;
never listed), ``layer`` (a failed snapshot the user deleted while a VM still
runs on its disk; never listed), ``staging`` (a build or import of the
operator's on its way to a system snapshot, ``system_builds``; never listed).

Disks form chains: a saved disk is written on top of its parent snapshot's disk
(``parent_id``), and a VM's own overlay on top of ``Vm.disk_snapshot_id``. So a
snapshot can be deleted only when no snapshot has it as parent and no VM that
still has a disk writes on top of it (409 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from kiln.config import Settings
from kiln.node.node import Node
from kiln.runtime.driver import SavedState, SaveOutcome
from kiln.runtime.errors import SaveError
from kiln.runtime.snapshots import directory_size, remove_saved
from kiln.services.background import BackgroundTasks
from kiln.services.disk_budget import DiskBudget
from kiln.services.errors import Conflict, Forbidden, InvalidRequest, NotFound
from kiln.services.events.record import by_user, snapshot_event
from kiln.services.events.record import record as record_event
from kiln.services.snapshots.housekeeping import Housekeeping
from kiln.services.snapshots.rows import (
    EVENT_TYPES,
    check_snapshot_quota,
    dependents,
    new_snapshot_id,
    now,
    record,
    reload,
)
from kiln.services.states import LISTED_TYPES, SnapshotStatus, SnapshotType, VmStatus
from kiln.services.volumes import captures
from kiln.store.db import Database
from kiln.store.models import Snapshot, Vm
from kiln.store.repositories import SnapshotRepository, VmRepository

log = logging.getLogger(__name__)

S = VmStatus


class SnapshotService:
    def __init__(
        self, settings: Settings, db: Database, node: Node, background: BackgroundTasks, disk: DiskBudget
    ) -> None:
        self._settings = settings
        self._disk = disk
        self._db = db
        self._node = node
        self._background = background
        self.housekeeping = Housekeeping(settings, db, node, background)

    # -- user operations -------------------------------------------------------------

    async def snapshot_vm(self, owner_id: int, vm_id: str, name: str | None, wait: bool) -> Snapshot:
        """Save a running VM, which keeps running (POST /v1/vms/{id}/snapshot)."""
        async with self._db.transaction() as session:
            vm = await VmRepository(session).get(owner_id, vm_id)
        if vm is None:
            raise NotFound(f"vm {vm_id} not found")
        if vm.status != S.RUNNING:
            raise Conflict(f"vm {vm_id} is {vm.status}; only a running VM can be snapshotted")
        captures.check_capturable(self._node, vm_id)
        snapshot = await self._add(vm, SnapshotType.USER, name)
        task = self._background.run(self._save(vm.id, snapshot.id, keep_running=True), f"snapshot {snapshot.id}")
        if wait:
            # Shielded: a client that hangs up must not cut a save short. A failure
            # is recorded on the snapshot (status failed, failure_reason).
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        return await reload(self._db, snapshot.id)

    async def list(self, owner_id: int, snapshot_type: str | None) -> list[Snapshot]:
        if snapshot_type is not None and snapshot_type not in LISTED_TYPES:
            raise InvalidRequest.single(("type",), f"must be one of {', '.join(LISTED_TYPES)}")
        types = [snapshot_type] if snapshot_type else list(LISTED_TYPES)
        async with self._db.transaction() as session:
            return await SnapshotRepository(session).list(owner_id, types)

    async def get(self, owner_id: int, snapshot_id: str) -> Snapshot:
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).get(owner_id, snapshot_id)
        if snapshot is None or snapshot.type not in LISTED_TYPES:
            raise NotFound(f"snapshot {snapshot_id} not found")
        return snapshot

    async def delete(self, owner_id: int, snapshot_id: str) -> None:
        snapshot = await self.get(owner_id, snapshot_id)
        if snapshot.type == SnapshotType.BASE:
            raise Conflict(
                f"snapshot {snapshot_id} is a base snapshot: it belongs to its image, "
                "and VMs are made from it; it cannot be deleted through the API"
            )
        if snapshot.type == SnapshotType.SYSTEM:
            raise Forbidden(
                f"snapshot {snapshot_id} is a system snapshot: published by the operator for every "
                "user and read-only to them (the operator removes it: DELETE /v1/system-snapshots/{id})"
            )
        await self.remove(snapshot, owner_id)

    async def remove(self, snapshot: Snapshot, actor_id: int) -> None:
        """Delete the snapshot and its files, unless it is being made or a VM or
        another snapshot builds on it (409); ``actor_id`` asked for it."""
        snapshot_id = snapshot.id
        if snapshot.status == SnapshotStatus.CREATING:
            raise Conflict(f"snapshot {snapshot_id} is still being made")
        # Suspended states of ended VMs may be all that still hangs off it.
        await self.housekeeping.collect_garbage()
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            vms, children = await dependents(repository, snapshot_id)
            if snapshot.status == SnapshotStatus.FAILED and vms and not children:
                # A save that failed after the VM moved onto the frozen disk:
                # the snapshot goes, the disk under the running VM stays.
                await repository.update_any_owner(snapshot_id, type=SnapshotType.LAYER, name=None)
                return
            if vms or children:
                users = [f"vm {vm}" for vm in vms] + [f"snapshot {child}" for child in children]
                raise Conflict(f"snapshot {snapshot_id} is in use by {', '.join(users)}")
            await repository.delete(snapshot)
            event = snapshot_event(snapshot, "snapshot.deleted", **by_user(actor_id))
            # A public snapshot has no owner: its event is the operator's who removed it.
            await record_event(session, replace(event, owner_id=snapshot.owner_id or actor_id))
        await asyncio.to_thread(remove_saved, Path(snapshot.directory))
        await captures.forget(self._node, snapshot.id, snapshot.mounts)

    # -- for the VM service ----------------------------------------------------------

    async def save_build(self, vm_id: str, snapshot_id: str) -> None:
        """Save a builder VM, which keeps running, into its build's record
        (``builds.ImageBuilder``)."""
        await self._save(vm_id, snapshot_id, keep_running=True)

    async def save_before_teardown(self, vm: Vm, snapshot_type: SnapshotType, name: str | None) -> Snapshot:
        """Save a VM that is about to stop (terminate with snapshot_on_terminate,
        suspend): its process stops and its disk moves into the snapshot."""
        snapshot = await self._add(vm, snapshot_type, name)
        await self._save(vm.id, snapshot.id, keep_running=False)
        return await reload(self._db, snapshot.id)

    async def adopt_suspend_state(self, snapshot_id: str, name: str | None) -> Snapshot:
        """A suspended VM being terminated with snapshot_on_terminate: its saved
        state already is the snapshot wanted; it becomes the user's (type auto)."""
        await record(self._db, snapshot_id, None, type=SnapshotType.AUTO, name=name)
        return await reload(self._db, snapshot_id)

    async def saved_state_of(self, snapshot_id: str) -> SavedState:
        snapshot = await reload(self._db, snapshot_id)
        return self._node.saved_state(Path(snapshot.directory))

    async def settle_interrupted_save(self, vm: Vm) -> tuple[SaveOutcome | None, str | None]:
        """After a restart: finish or undo the save of ``vm`` (caught running,
        suspending or terminating) that the stop cut short, and record the
        snapshot as ``ready`` or ``failed``. Returns what became of it and the
        snapshot's id; (None, None): no save was in progress."""
        async with self._db.transaction() as session:
            snapshots = [
                s for s in await SnapshotRepository(session).list_any_owner()
                if s.source_vm_id == vm.id and s.status == SnapshotStatus.CREATING
            ]  # fmt: skip
        outcome, snapshot_id = None, None
        keep_running = vm.status == S.RUNNING
        for snapshot in snapshots:
            recovery = await self._node.recover_save(
                vm.id, self._settings.vms_dir / vm.id, Path(snapshot.directory), keep_running=keep_running
            )
            outcome, snapshot_id = recovery.outcome, snapshot.id
            log.warning("vm %s: the save into snapshot %s that a stop cut short was %s", vm.id, snapshot.id, outcome)
            if outcome == SaveOutcome.COMPLETED:
                size = await asyncio.to_thread(directory_size, Path(snapshot.directory))
                await record(self._db, snapshot.id, vm.id, status=SnapshotStatus.READY, size_bytes=size)
            else:
                reason = "the server stopped while the snapshot was being made"
                on_it = vm.id if outcome == SaveOutcome.DISK_KEPT else None
                await record(self._db, snapshot.id, on_it, status=SnapshotStatus.FAILED, failure_reason=reason)
        return outcome, snapshot_id

    async def is_suspend_state_of(self, vm: Vm) -> bool:
        """True when the VM's disk stands on a finished save of its own suspend."""
        if vm.disk_snapshot_id is None:
            return False
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).get_any_owner(vm.disk_snapshot_id)
        return (
            snapshot is not None and snapshot.type == SnapshotType.SUSPEND
            and snapshot.status == SnapshotStatus.READY and snapshot.source_vm_id == vm.id
        )  # fmt: skip

    async def fail_unfinished(self) -> None:
        """Snapshots still ``creating`` once the VMs were settled (imports a stop cut short)."""
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            for snapshot in await repository.list_any_owner():
                if snapshot.status == SnapshotStatus.CREATING:
                    await repository.update_any_owner(
                        snapshot.id,
                        status=SnapshotStatus.FAILED,
                        failure_reason="the server stopped while the snapshot was being made",
                    )

    # -- internals -------------------------------------------------------------------

    async def _add(self, vm: Vm, snapshot_type: SnapshotType, name: str | None) -> Snapshot:
        # A save writes up to the VM's memory (its disk only freezes): refused
        # before any record is made when the disk cannot take it.
        await asyncio.to_thread(self._disk.check_save, vm.memory_mb * 2**20)
        snapshot_id = new_snapshot_id()
        async with self._db.transaction() as session:
            if snapshot_type in LISTED_TYPES:
                await check_snapshot_quota(session, vm.owner_id, self._settings.quota_snapshots)
            snapshot = await SnapshotRepository(session).add(
                Snapshot(
                    id=snapshot_id,
                    owner_id=vm.owner_id,
                    name=name,
                    type=snapshot_type,
                    status=SnapshotStatus.CREATING,
                    vcpu_count=vm.vcpu_count,
                    memory_mb=vm.memory_mb,
                    image_variant=vm.image_variant,
                    size_bytes=0,
                    source_vm_id=vm.id,
                    parent_id=vm.disk_snapshot_id,
                    directory=str((self._settings.snapshots_dir / snapshot_id).resolve()),
                    created_at=now(),
                )
            )
            if snapshot_type in EVENT_TYPES:
                await record_event(session, snapshot_event(snapshot, "snapshot.created"))
            return snapshot

    async def _save(self, vm_id: str, snapshot_id: str, *, keep_running: bool) -> None:
        """Save the VM into the snapshot's directory and record the outcome, one
        save of a VM at a time.

        Either way the VM's disk may now be written on top of the snapshot's
        disk (the save froze it); then the VM depends on the snapshot."""
        snapshot = await reload(self._db, snapshot_id)
        # The states a VM is in for each kind of save (the caller moved it there).
        allowed = (S.RUNNING,) if keep_running else (S.SUSPENDING, S.TERMINATING)
        # The snapshot the VM's disk stood on when the save froze it: the new
        # snapshot's parent (another save of the VM may have finished since _add).
        disk_parent: str | None = None
        mounts: list[dict[str, Any]] = []
        try:
            async with self._node.machines.save_lock(vm_id):
                async with self._db.transaction() as session:
                    vm = await VmRepository(session).get_any_owner(vm_id)
                if vm is None or vm.status not in allowed or self._node.machine(vm_id) is None:
                    status = vm.status if vm is not None else "gone"
                    raise Conflict(f"vm {vm_id} is {status}; there is no running VM to save")
                disk_parent = vm.disk_snapshot_id
                if snapshot.type != SnapshotType.SUSPEND:
                    # A suspended VM comes back with its own drives; any other
                    # restore needs what they hold now (see captures).
                    async def keep(drives: list[dict[str, Any]]) -> None:
                        await record(self._db, snapshot_id, None, mounts=drives)

                    mounts = await captures.pause_and_capture(
                        self._node, vm_id, snapshot_id, stopping=not keep_running, keep=keep
                    )
                saved = await self._node.save(vm_id, Path(snapshot.directory), keep_running=keep_running)
        except Exception as error:
            await captures.forget(self._node, snapshot_id, mounts)
            disk_in_use = isinstance(error, SaveError) and error.disk_in_use
            log.warning("snapshot %s of vm %s failed: %s", snapshot_id, vm_id, error)
            await record(
                self._db,
                snapshot_id,
                vm_id if disk_in_use else None,
                status=SnapshotStatus.FAILED,
                failure_reason=str(error) or type(error).__name__,
                parent_id=disk_parent if disk_in_use else snapshot.parent_id,
            )
            raise
        size = await asyncio.to_thread(directory_size, saved.directory)
        await record(
            self._db, snapshot_id, vm_id, status=SnapshotStatus.READY, size_bytes=size, parent_id=disk_parent
        )
        await self.housekeeping.flatten_if_deep(snapshot_id)

