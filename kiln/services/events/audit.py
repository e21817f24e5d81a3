"""Reading the event stream (``/v1/audit``) and keeping it to its retention.

A user sees their own events; the admin sees everyone's. Another user's event
is ``NotFound``, as every other resource. Pages are newest first; the cursor
is the id of the last event of a page (opaque to clients: the SDK only
passes ``next_cursor`` back).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from kiln.services.errors import NotFound
from kiln.services.events.catalog import CATALOG
from kiln.services.users import ADMIN_USERNAME
from kiln.store.db import Database
from kiln.store.events import EventFilter, EventRepository
from kiln.store.models import Event, User, utc_now
from kiln.store.webhooks import WebhookRepository

log = logging.getLogger(__name__)

MAX_PAGE = 200
PRUNE_INTERVAL_SECONDS = 3600.0


@dataclass(frozen=True)
class EventPage:
    items: list[Event]
    next_cursor: str | None


def is_admin(user: User) -> bool:
    return user.username == ADMIN_USERNAME


class AuditService:
    def __init__(self, db: Database, retention_days: int) -> None:
        self._db = db
        self._retention = timedelta(days=retention_days)
        self._loop: asyncio.Task[None] | None = None

    def catalog(self) -> dict[str, list[str]]:
        return {group: list(kinds) for group, kinds in CATALOG.items()}

    async def page(self, user: User, wanted: EventFilter, before: int | None, limit: int) -> EventPage:
        """Events older than id ``before`` (None: the newest)."""
        # One more than asked: whether there is a next page, without a second query.
        async with self._db.transaction() as session:
            events = EventRepository(session)
            if is_admin(user):
                rows = await events.page_any_owner(wanted, before, limit + 1)
            else:
                rows = await events.page(user.id, wanted, before, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return EventPage(rows, str(rows[-1].id) if more else None)

    async def get(self, user: User, event_id: int) -> Event:
        async with self._db.transaction() as session:
            events = EventRepository(session)
            event = await (events.get_any_owner(event_id) if is_admin(user) else events.get(user.id, event_id))
        if event is None:
            raise NotFound(f"event {event_id} not found")
        return event

    async def prune(self) -> int:
        """Remove events, and webhook deliveries that ended, older than the retention;
        how many rows went. (A pending delivery stays: it is still owed.)"""
        cutoff = utc_now() - self._retention
        async with self._db.transaction() as session:
            removed = await EventRepository(session).delete_older_than_any_owner(cutoff)
            removed += await WebhookRepository(session).delete_finished_before_any_owner(cutoff)
        if removed:
            log.info("removed %d events and deliveries older than %s", removed, self._retention)
        return removed

    def start(self) -> None:
        self._loop = asyncio.create_task(self._prune_forever(), name="events-retention")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("pruning old events failed")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
