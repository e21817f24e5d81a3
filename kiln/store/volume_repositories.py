"""Queries of the volume tables: volumes, their checkpoints, their mounts.

Every method that serves a user takes ``owner_id``; the ``*_any_owner`` ones
serve the services' own bookkeeping (settling after a restart, a VM's end).
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import Snapshot, Vm, Volume, VolumeCheckpoint, VolumeMount


class VolumeRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, volume: Volume) -> Volume:
        self.session.add(volume)
        await self.session.flush()
        return volume

    async def get(self, owner_id: int, volume_id: str) -> Volume | None:
        return await self.session.scalar(
            select(Volume).where(Volume.owner_id == owner_id, Volume.id == volume_id)
        )

    async def lock(self, owner_id: int, volume_id: str) -> Volume | None:
        """The owner's volume, locked until the transaction ends: a no-op
        UPDATE takes SQLite's write lock and PostgreSQL's row lock, so two
        transactions that change the volume's mounts (or delete it) run one
        after the other and the second sees what the first wrote."""
        result = await self.session.execute(
            update(Volume)
            .where(Volume.owner_id == owner_id, Volume.id == volume_id)
            .values(updated_at=Volume.updated_at)
            .execution_options(synchronize_session=False)
        )
        if not getattr(result, "rowcount", 0):
            return None
        return await self.get(owner_id, volume_id)

    async def list(self, owner_id: int) -> list[Volume]:
        rows = await self.session.scalars(
            select(Volume).where(Volume.owner_id == owner_id).order_by(Volume.created_at, Volume.id)
        )
        return list(rows)

    async def ids_any_owner(self) -> set[str]:
        return set(await self.session.scalars(select(Volume.id)))

    async def update_any_owner(self, volume_id: str, **fields: object) -> None:
        """The service's own record keeping (usage counted, a resize done)."""
        await self.session.execute(
            update(Volume).where(Volume.id == volume_id).values(**fields).execution_options(synchronize_session=False)
        )

    async def delete(self, volume: Volume) -> None:
        await self.session.delete(volume)
        await self.session.flush()

    async def disk_bytes(self, owner_id: int) -> int:
        """What counts against the owner's disk quota: the size every volume
        may grow to, and what every snapshot of theirs takes."""
        volumes = await self.session.scalar(
            select(func.coalesce(func.sum(Volume.quota_bytes), 0)).where(Volume.owner_id == owner_id)
        )
        snapshots = await self.session.scalar(
            select(func.coalesce(func.sum(Snapshot.size_bytes), 0)).where(Snapshot.owner_id == owner_id)
        )
        return int(volumes or 0) + int(snapshots or 0)


class CheckpointRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, checkpoint: VolumeCheckpoint) -> VolumeCheckpoint:
        self.session.add(checkpoint)
        await self.session.flush()
        return checkpoint

    async def get(self, owner_id: int, volume_id: str, checkpoint_id: str) -> VolumeCheckpoint | None:
        return await self.session.scalar(
            select(VolumeCheckpoint).where(
                VolumeCheckpoint.owner_id == owner_id,
                VolumeCheckpoint.volume_id == volume_id,
                VolumeCheckpoint.id == checkpoint_id,
            )
        )

    async def list(self, owner_id: int, volume_id: str) -> list[VolumeCheckpoint]:
        rows = await self.session.scalars(
            select(VolumeCheckpoint)
            .where(VolumeCheckpoint.owner_id == owner_id, VolumeCheckpoint.volume_id == volume_id)
            .order_by(VolumeCheckpoint.created_at, VolumeCheckpoint.id)
        )
        return list(rows)

    async def ids_any_owner(self, volume_id: str) -> set[str]:
        return set(
            await self.session.scalars(select(VolumeCheckpoint.id).where(VolumeCheckpoint.volume_id == volume_id))
        )

    async def delete(self, checkpoint: VolumeCheckpoint) -> None:
        await self.session.delete(checkpoint)
        await self.session.flush()


class MountRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, mount: VolumeMount) -> VolumeMount:
        self.session.add(mount)
        await self.session.flush()
        return mount

    async def of_vm(self, owner_id: int, vm_id: str) -> list[VolumeMount]:
        rows = await self.session.scalars(
            select(VolumeMount)
            .where(VolumeMount.owner_id == owner_id, VolumeMount.vm_id == vm_id)
            .order_by(VolumeMount.id)
        )
        return list(rows)

    async def of_volume(
        self, owner_id: int, volume_id: str, vm_statuses: Collection[str]
    ) -> builtins.list[VolumeMount]:
        """The mounts of the volume by VMs in ``vm_statuses``."""
        rows = await self.session.scalars(
            select(VolumeMount)
            .join(Vm, Vm.id == VolumeMount.vm_id)
            .where(
                VolumeMount.owner_id == owner_id,
                VolumeMount.volume_id == volume_id,
                Vm.status.in_(vm_statuses),
            )
            .order_by(VolumeMount.id)
        )
        return list(rows)

    async def volumes_in_use(self, owner_id: int, vm_statuses: Collection[str]) -> set[str]:
        rows = await self.session.scalars(
            select(VolumeMount.volume_id)
            .join(Vm, Vm.id == VolumeMount.vm_id)
            .where(VolumeMount.owner_id == owner_id, Vm.status.in_(vm_statuses))
        )
        return set(rows)

    async def set_status_any_owner(self, mount_id: int, status: str, failure_reason: str | None = None) -> None:
        await self.session.execute(
            update(VolumeMount)
            .where(VolumeMount.id == mount_id)
            .values(status=status, failure_reason=failure_reason)
            .execution_options(synchronize_session=False)
        )

    async def set_vm_status_any_owner(self, vm_id: str, current: str, status: str) -> builtins.list[VolumeMount]:
        """Every mount of the VM still in ``current`` moves to ``status``; those mounts."""
        moved = await self._of_vm_any_owner(vm_id, VolumeMount.status == current)
        await self.session.execute(
            update(VolumeMount)
            .where(VolumeMount.vm_id == vm_id, VolumeMount.status == current)
            .values(status=status)
            .execution_options(synchronize_session=False)
        )
        return moved

    async def delete_any_owner(self, mount_id: int) -> None:
        await self.session.execute(delete(VolumeMount).where(VolumeMount.id == mount_id))

    async def delete_of_vm_any_owner(self, vm_id: str) -> builtins.list[VolumeMount]:
        """Remove the VM's mounts; the ones there were."""
        gone = await self._of_vm_any_owner(vm_id)
        await self.session.execute(delete(VolumeMount).where(VolumeMount.vm_id == vm_id))
        return gone

    async def _of_vm_any_owner(self, vm_id: str, *where: Any) -> builtins.list[VolumeMount]:
        rows = await self.session.scalars(
            select(VolumeMount).where(VolumeMount.vm_id == vm_id, *where).order_by(VolumeMount.id)
        )
        return list(rows)
