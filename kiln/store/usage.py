"""Queries of the usage ledger (``usage_intervals``)."""

from __future__ import annotations

import builtins
from datetime import datetime

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import UsageInterval


class UsageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def open_any_owner(self, interval: UsageInterval) -> UsageInterval:
        """The VM service's own bookkeeping, at a transition (the owner is the VM's)."""
        self.session.add(interval)
        await self.session.flush()
        return interval

    async def close_any_owner(self, vm_id: str, at: datetime) -> None:
        await self.session.execute(
            update(UsageInterval)
            .where(UsageInterval.vm_id == vm_id, UsageInterval.ended_at.is_(None))
            .values(ended_at=at)
            .execution_options(synchronize_session=False)
        )

    async def overlapping(self, owner_id: int, start: datetime, end: datetime) -> builtins.list[UsageInterval]:
        """The owner's intervals that overlap [start, end)."""
        rows = await self.session.scalars(
            select(UsageInterval)
            .where(
                UsageInterval.owner_id == owner_id,
                UsageInterval.started_at < end,
                or_(UsageInterval.ended_at.is_(None), UsageInterval.ended_at > start),
            )
            .order_by(UsageInterval.started_at, UsageInterval.id)
        )
        return list(rows)

    async def of_session(self, owner_id: int, session_id: str) -> builtins.list[UsageInterval]:
        rows = await self.session.scalars(
            select(UsageInterval)
            .where(UsageInterval.owner_id == owner_id, UsageInterval.session_id == session_id)
            .order_by(UsageInterval.id)
        )
        return list(rows)
