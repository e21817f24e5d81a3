"""Snapshot rows: ids, loading, recording an outcome, what depends on one."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.services.errors import NotFound, QuotaExceeded
from kiln.services.events.record import record as record_event
from kiln.services.events.record import snapshot_event
from kiln.services.states import STATES_WITH_A_DISK, SnapshotStatus, SnapshotType
from kiln.store.db import Database
from kiln.store.models import Snapshot
from kiln.store.repositories import SnapshotRepository, VmRepository

# An imported image's rootfs, inside its snapshot's directory (under its saved disk).
IMPORTED_ROOTFS_NAME = "rootfs.ext4"

# The snapshots users own and see have events; suspend states and layers are the server's.
EVENT_TYPES = (SnapshotType.USER, SnapshotType.AUTO)


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(8)


def base_snapshot_id(key: str) -> str:
    return "base-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def now() -> datetime:
    return datetime.now(UTC)


async def reload(db: Database, snapshot_id: str) -> Snapshot:
    async with db.transaction() as session:
        snapshot = await SnapshotRepository(session).get_any_owner(snapshot_id)
    if snapshot is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    return snapshot


async def record(db: Database, snapshot_id: str, vm_on_it: str | None, **fields: object) -> None:
    """Update the snapshot; ``vm_on_it``: that VM's disk is now written on top
    of the snapshot's disk (a save froze it), in the same transaction."""
    async with db.transaction() as session:
        snapshots = SnapshotRepository(session)
        await snapshots.update_any_owner(snapshot_id, **fields)
        if vm_on_it is not None:
            await VmRepository(session).set_disk_snapshot_any_owner(vm_on_it, snapshot_id)
        if fields.get("status") in (SnapshotStatus.READY, SnapshotStatus.FAILED):
            snapshot = await snapshots.get_any_owner(snapshot_id)
            if snapshot is not None and snapshot.owner_id is not None and snapshot.type in EVENT_TYPES:
                if snapshot.status == SnapshotStatus.READY:
                    event = snapshot_event(snapshot, "snapshot.ready")
                else:
                    event = snapshot_event(
                        snapshot, "snapshot.failed", status="failure", error_message=snapshot.failure_reason
                    )
                await record_event(session, event)


async def check_snapshot_quota(session: AsyncSession, owner_id: int, quota: int) -> None:
    """QuotaExceeded if the user has ``quota`` snapshots (theirs: user and auto) already."""
    owned = len(await SnapshotRepository(session).list(owner_id, [SnapshotType.USER, SnapshotType.AUTO]))
    if owned >= quota:
        raise QuotaExceeded(f"quota snapshots: you have {owned} of {quota} (KILN_QUOTA_SNAPSHOTS)")


async def dependents(snapshots: SnapshotRepository, snapshot_id: str) -> tuple[list[str], list[str]]:
    """The VMs whose disk is written on top of the snapshot's, and the snapshots
    whose disk is."""
    vms = await snapshots.vms_on_disk_any_owner(snapshot_id, STATES_WITH_A_DISK)
    return vms, await snapshots.children_any_owner(snapshot_id)
