"""Queries, one repository per table, each bound to one ``AsyncSession``.

Every method that serves a user takes ``owner_id`` and filters on it. The few
owner-blind methods exist for authentication and for the VM service's own
background loops (reaper, watchdog, adoption, admission); their names say so.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import (
    ApiKey,
    ExecutionTask,
    HostResourceRow,
    SandboxSession,
    Snapshot,
    User,
    Vm,
)


def _rows_changed(result: object) -> int:
    """Rows an UPDATE changed (its result is a ``CursorResult``)."""
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, username: str, password_hash: str | None) -> User:
        user = User(username=username, password_hash=password_hash)
        self.session.add(user)
        await self.session.flush()
        return user

    async def by_id(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)

    async def by_username(self, username: str) -> User | None:
        return await self.session.scalar(select(User).where(User.username == username))

    async def list_all(self) -> list[User]:
        return list(await self.session.scalars(select(User).order_by(User.username)))


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, owner_id: int, name: str, prefix: str, key_hash: str) -> ApiKey:
        key = ApiKey(owner_id=owner_id, name=name, prefix=prefix, key_hash=key_hash)
        self.session.add(key)
        await self.session.flush()
        return key

    async def by_hash_any_owner(self, key_hash: str) -> ApiKey | None:
        """Authentication: the key itself is what tells who the owner is."""
        return await self.session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))

    async def list(self, owner_id: int) -> list[ApiKey]:
        rows = await self.session.scalars(
            select(ApiKey).where(ApiKey.owner_id == owner_id).order_by(ApiKey.id)
        )
        return list(rows)

    async def get(self, owner_id: int, key_id: int) -> ApiKey | None:
        return await self.session.scalar(
            select(ApiKey).where(ApiKey.owner_id == owner_id, ApiKey.id == key_id)
        )

    async def get_any_owner(self, key_id: int) -> ApiKey | None:
        """For the operator's CLI (``kiln keys revoke``), which acts for every user."""
        return await self.session.get(ApiKey, key_id)

    async def delete(self, key: ApiKey) -> None:
        await self.session.delete(key)
        await self.session.flush()


class SessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, owner_id: int, session_id: str) -> SandboxSession | None:
        return await self.session.get(SandboxSession, (owner_id, session_id))

    async def get_or_add(self, owner_id: int, session_id: str) -> SandboxSession:
        existing = await self.get(owner_id, session_id)
        if existing is not None:
            return existing
        created = SandboxSession(owner_id=owner_id, id=session_id)
        self.session.add(created)
        await self.session.flush()
        return created


@dataclass(frozen=True)
class ResourceUsage:
    vms: int
    memory_mb: int
    vcpus: int


class VmRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, vm: Vm) -> Vm:
        self.session.add(vm)
        await self.session.flush()
        return vm

    async def get(self, owner_id: int, vm_id: str) -> Vm | None:
        return await self.session.scalar(
            select(Vm).where(Vm.owner_id == owner_id, Vm.id == vm_id)
        )

    async def list(self, owner_id: int, statuses: Collection[str] | None = None) -> list[Vm]:
        query = select(Vm).where(Vm.owner_id == owner_id)
        if statuses is not None:
            query = query.where(Vm.status.in_(statuses))
        rows = await self.session.scalars(query.order_by(Vm.created_at, Vm.id))
        return list(rows)

    async def for_session(
        self, owner_id: int, session_id: str, statuses: Collection[str]
    ) -> Vm | None:
        return await self.session.scalar(
            select(Vm)
            .where(Vm.owner_id == owner_id, Vm.session_id == session_id, Vm.status.in_(statuses))
            .order_by(Vm.created_at.desc())
            .limit(1)
        )

    async def get_any_owner(self, vm_id: str) -> Vm | None:
        return await self.session.get(Vm, vm_id)

    async def list_any_owner(self, statuses: Collection[str]) -> builtins.list[Vm]:
        rows = await self.session.scalars(
            select(Vm).where(Vm.status.in_(statuses)).order_by(Vm.created_at)
        )
        return list(rows)

    async def ids_in_status_any_owner(
        self, vm_ids: Collection[str], statuses: Collection[str]
    ) -> builtins.list[str]:
        rows = await self.session.scalars(
            select(Vm.id).where(Vm.id.in_(vm_ids), Vm.status.in_(statuses))
        )
        return list(rows)

    async def expired_any_owner(self, statuses: Collection[str], now: datetime) -> builtins.list[str]:
        rows = await self.session.scalars(
            select(Vm.id).where(Vm.status.in_(statuses), Vm.expires_at <= now)
        )
        return list(rows)

    async def usage_any_owner(self, statuses: Collection[str]) -> ResourceUsage:
        return await self._usage(Vm.status.in_(statuses))

    async def usage(self, owner_id: int, statuses: Collection[str]) -> ResourceUsage:
        return await self._usage(Vm.status.in_(statuses), Vm.owner_id == owner_id)

    async def _usage(self, *conditions: Any) -> ResourceUsage:
        row = (
            await self.session.execute(
                select(
                    func.count(Vm.id),
                    func.coalesce(func.sum(Vm.memory_mb), 0),
                    func.coalesce(func.sum(Vm.vcpu_count), 0),
                ).where(*conditions)
            )
        ).one()
        return ResourceUsage(vms=int(row[0]), memory_mb=int(row[1]), vcpus=int(row[2]))

    async def set_disk_snapshot_any_owner(self, vm_id: str, snapshot_id: str) -> None:
        """The VM's disk is now written on top of this snapshot's (a save froze it)."""
        await self.session.execute(
            update(Vm)
            .where(Vm.id == vm_id)
            .values(disk_snapshot_id=snapshot_id)
            .execution_options(synchronize_session=False)
        )

    async def compare_and_set_status(
        self, vm_id: str, expected: str, status: str, **fields: Any
    ) -> bool:
        """Set ``status`` (and ``fields``) only if the VM is still in ``expected``.

        The VM service resolves ownership before it calls this; the check on the
        old status is what makes concurrent transitions (a DELETE racing the boot
        task or the reaper) safe: exactly one of them wins.
        """
        result = await self.session.execute(
            update(Vm)
            .where(Vm.id == vm_id, Vm.status == expected)
            .values(status=status, **fields)
            .execution_options(synchronize_session=False)
        )
        return _rows_changed(result) == 1


class ExecutionTaskRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, task: ExecutionTask) -> ExecutionTask:
        self.session.add(task)
        await self.session.flush()
        return task

    async def get(self, owner_id: int, task_id: str) -> ExecutionTask | None:
        return await self.session.scalar(
            select(ExecutionTask).where(
                ExecutionTask.owner_id == owner_id, ExecutionTask.id == task_id
            )
        )

    async def finish_any_owner(self, task_id: str, expected: str, **fields: Any) -> bool:
        """Record the end of a task still in ``expected`` status (the runner owns its task)."""
        result = await self.session.execute(
            update(ExecutionTask)
            .where(ExecutionTask.id == task_id, ExecutionTask.status == expected)
            .values(**fields)
            .execution_options(synchronize_session=False)
        )
        return _rows_changed(result) == 1

    async def finish_all_in_status_any_owner(self, current: str, **fields: Any) -> int:
        """Settle every task left in ``current`` status (after a restart nobody runs them)."""
        result = await self.session.execute(
            update(ExecutionTask)
            .where(ExecutionTask.status == current)
            .values(**fields)
            .execution_options(synchronize_session=False)
        )
        return _rows_changed(result)


# Snapshots no user owns and every user sees: images booted once, and those the operator published.
PUBLIC_SNAPSHOT_TYPES = ("base", "system")


class SnapshotRepository:
    """Snapshots of one owner, plus the public ones (no owner) everyone sees."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, snapshot: Snapshot) -> Snapshot:
        self.session.add(snapshot)
        await self.session.flush()
        return snapshot

    async def get(self, owner_id: int, snapshot_id: str) -> Snapshot | None:
        """The owner's snapshot, or a public one; never another user's."""
        return await self.session.scalar(
            select(Snapshot).where(
                Snapshot.id == snapshot_id,
                or_(Snapshot.owner_id == owner_id, Snapshot.type.in_(PUBLIC_SNAPSHOT_TYPES)),
            )
        )

    async def list(self, owner_id: int, types: Collection[str]) -> list[Snapshot]:
        rows = await self.session.scalars(
            select(Snapshot)
            .where(
                Snapshot.type.in_(types),
                or_(Snapshot.owner_id == owner_id, Snapshot.type.in_(PUBLIC_SNAPSHOT_TYPES)),
            )
            .order_by(Snapshot.created_at, Snapshot.id)
        )
        return list(rows)

    async def get_any_owner(self, snapshot_id: str) -> Snapshot | None:
        return await self.session.get(Snapshot, snapshot_id)

    async def list_any_owner(self, types: Collection[str] | None = None) -> builtins.list[Snapshot]:
        query = select(Snapshot)
        if types is not None:
            query = query.where(Snapshot.type.in_(types))
        return list(await self.session.scalars(query.order_by(Snapshot.created_at)))

    async def children_any_owner(self, snapshot_id: str) -> builtins.list[str]:
        rows = await self.session.scalars(
            select(Snapshot.id).where(Snapshot.parent_id == snapshot_id)
        )
        return list(rows)

    async def vms_on_disk_any_owner(
        self, snapshot_id: str, statuses: Collection[str]
    ) -> builtins.list[str]:
        """VMs (in ``statuses``) whose disk is written on top of this snapshot's."""
        rows = await self.session.scalars(
            select(Vm.id).where(Vm.disk_snapshot_id == snapshot_id, Vm.status.in_(statuses))
        )
        return list(rows)

    async def update_any_owner(self, snapshot_id: str, **fields: Any) -> None:
        await self.session.execute(
            update(Snapshot)
            .where(Snapshot.id == snapshot_id)
            .values(**fields)
            .execution_options(synchronize_session=False)
        )

    async def delete(self, snapshot: Snapshot) -> None:
        await self.session.delete(snapshot)
        await self.session.flush()


class HostResourceRepository:
    """The ledger of host resources; owner-blind: it serves the node side's
    bookkeeping, never a user's request."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def upsert_any_owner(self, row: HostResourceRow) -> None:
        existing = await self.session.get(HostResourceRow, (row.kind, row.name))
        if existing is None:
            self.session.add(row)
        else:
            existing.vm_id, existing.owner_id, existing.detail = row.vm_id, row.owner_id, row.detail
        await self.session.flush()

    async def delete_any_owner(self, kind: str, name: str) -> None:
        await self.session.execute(
            delete(HostResourceRow).where(HostResourceRow.kind == kind, HostResourceRow.name == name)
        )

    async def of_vm_any_owner(self, vm_id: str) -> builtins.list[HostResourceRow]:
        rows = await self.session.scalars(select(HostResourceRow).where(HostResourceRow.vm_id == vm_id))
        return list(rows)

    async def all_any_owner(self) -> builtins.list[HostResourceRow]:
        return list(await self.session.scalars(select(HostResourceRow)))

    async def set_owner_any_owner(self, vm_id: str, owner_id: int) -> None:
        """A pool VM's resources become its new owner's (in the claim's transaction)."""
        await self.session.execute(
            update(HostResourceRow)
            .where(HostResourceRow.vm_id == vm_id)
            .values(owner_id=owner_id)
            .execution_options(synchronize_session=False)
        )
