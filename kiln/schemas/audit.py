"""Wire models of the audit log (the instavm SDK's ``client.audit``: ``catalog``,
``events``, ``get_event``; its CLI's ``events tail/get/catalog``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class EventRecord(BaseModel):
    # The id as a string: the SDK quotes it into a path, the CLI prints it.
    id: str
    event_group: str
    event_type: str
    # success, failure, or denied (a refusal: a quota, a login).
    status: str
    user_id: int | None
    actor_type: str
    actor_id: str | None
    vm_id: str | None
    session_id: str | None
    resource_type: str | None
    resource_id: str | None
    event_payload: dict[str, Any]
    error_message: str | None
    created_at: datetime


class EventPage(BaseModel):
    """Newest first; ``next_cursor`` (None on the last page) asks for the older ones."""

    items: list[EventRecord]
    next_cursor: str | None


class EventCatalog(BaseModel):
    """Every event type by group."""

    catalog: dict[str, list[str]]
