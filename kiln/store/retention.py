"""Deleting rows of things that ended long ago (``kiln.services.retention``).

Owner-blind by nature: the server's own housekeeping, on every user's rows.
Each method deletes only what ended before ``cutoff`` and says how many rows
went.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import CursorResult, delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import CustomDomain, ExecutionTask, SandboxSession, Share, Vm


def _deleted(result: object) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


class RetentionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def delete_vms_ended_before_any_owner(self, ended: Collection[str], cutoff: datetime) -> int:
        """VMs in an ``ended`` status since before ``cutoff`` (a failed VM has no
        ``terminated_at``: its last change counts), with their shares.

        A VM a custom domain still names stays until the domain worker has
        released the domain (it finds the domain's VM by its row)."""
        ids = list(
            await self.session.scalars(
                select(Vm.id).where(
                    Vm.status.in_(ended),
                    func.coalesce(Vm.terminated_at, Vm.updated_at) < cutoff,
                    ~exists().where(CustomDomain.vm_id == Vm.id),
                )
            )
        )
        if not ids:
            return 0
        await self.session.execute(delete(Share).where(Share.vm_id.in_(ids)))
        return _deleted(await self.session.execute(delete(Vm).where(Vm.id.in_(ids))))

    async def delete_sessions_without_vms_any_owner(self, cutoff: datetime) -> int:
        """Sessions made before ``cutoff`` whose VMs are all gone."""
        result = await self.session.execute(
            delete(SandboxSession).where(
                SandboxSession.created_at < cutoff,
                ~exists().where(Vm.owner_id == SandboxSession.owner_id, Vm.session_id == SandboxSession.id),
            )
        )
        return _deleted(result)

    async def delete_tasks_finished_before_any_owner(self, finished: Collection[str], cutoff: datetime) -> int:
        result = await self.session.execute(
            delete(ExecutionTask).where(
                ExecutionTask.status.in_(finished),
                ExecutionTask.completed_at.is_not(None),
                ExecutionTask.completed_at < cutoff,
            )
        )
        return _deleted(result)
