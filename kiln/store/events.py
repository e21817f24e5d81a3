"""Queries of the events table (the audit log and the webhook outbox).

Events are only ever added, read, and removed in bulk once older than the
retention. A user reads their own (``page``, ``get``); the admin and the
server's own loops read everyone's (``*_any_owner``).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, Select, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import Event


@dataclass(frozen=True)
class EventFilter:
    """The filters of ``GET /v1/audit/events``; None: any."""

    event_group: str | None = None
    event_type: str | None = None
    status: str | None = None
    user_id: int | None = None
    vm_id: str | None = None
    session_id: str | None = None


class EventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, event: Event) -> Event:
        self.session.add(event)
        await self.session.flush()
        return event

    async def get(self, owner_id: int, event_id: int) -> Event | None:
        return await self.session.scalar(select(Event).where(Event.id == event_id, Event.owner_id == owner_id))

    async def get_any_owner(self, event_id: int) -> Event | None:
        return await self.session.get(Event, event_id)

    async def page(self, owner_id: int, wanted: EventFilter, before: int | None, limit: int) -> builtins.list[Event]:
        """The owner's events matching ``wanted``, newest first, older than id ``before``."""
        query = _filtered(wanted, before, limit).where(Event.owner_id == owner_id)
        return list(await self.session.scalars(query))

    async def page_any_owner(self, wanted: EventFilter, before: int | None, limit: int) -> builtins.list[Event]:
        """Everyone's (the admin's view)."""
        return list(await self.session.scalars(_filtered(wanted, before, limit)))

    async def after_any_owner(self, after: int, limit: int) -> builtins.list[Event]:
        """Events with an id above ``after``, oldest first (the webhook fan-out's feed)."""
        query = select(Event).where(Event.id > after).order_by(Event.id).limit(limit)
        return list(await self.session.scalars(query))

    async def newest_id_any_owner(self) -> int:
        newest = await self.session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1))
        return int(newest or 0)

    async def delete_older_than_any_owner(self, cutoff: datetime) -> int:
        result = await self.session.execute(delete(Event).where(Event.created_at < cutoff))
        assert isinstance(result, CursorResult)
        return int(result.rowcount)


def _filtered(wanted: EventFilter, before: int | None, limit: int) -> Select[Any]:
    query = select(Event)
    for column, value in (
        (Event.event_group, wanted.event_group),
        (Event.event_type, wanted.event_type),
        (Event.status, wanted.status),
        (Event.owner_id, wanted.user_id),
        (Event.vm_id, wanted.vm_id),
        (Event.session_id, wanted.session_id),
    ):
        if value is not None:
            query = query.where(column == value)
    if before is not None:
        query = query.where(Event.id < before)
    return query.order_by(Event.id.desc()).limit(limit)
