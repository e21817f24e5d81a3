"""Counts for the operator's metrics (owner-blind by nature: the host's state)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import Vm, WebhookDelivery


async def vms_by_status_any_owner(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Vm.status, func.count(Vm.id)).group_by(Vm.status))
    return {str(status): int(count) for status, count in rows.all()}


async def deliveries_by_status_any_owner(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(
        select(WebhookDelivery.status, func.count(WebhookDelivery.id)).group_by(WebhookDelivery.status)
    )
    return {str(status): int(count) for status, count in rows.all()}
