"""Reading the event stream (``/v1/audit``); ``kiln.services.retention`` keeps it to its retention.

A user sees their own events; the admin sees everyone's. Another user's event
is ``NotFound``, as every other resource. Pages are newest first; the cursor
is the id of the last event of a page (opaque to clients: the SDK only
passes ``next_cursor`` back).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.services.errors import NotFound
from kiln.services.events.catalog import CATALOG
from kiln.services.users import ADMIN_USERNAME
from kiln.store.db import Database
from kiln.store.events import EventFilter, EventRepository
from kiln.store.models import Event, User

MAX_PAGE = 200


@dataclass(frozen=True)
class EventPage:
    items: list[Event]
    next_cursor: str | None


def is_admin(user: User) -> bool:
    return user.username == ADMIN_USERNAME


class AuditService:
    def __init__(self, db: Database) -> None:
        self._db = db

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
