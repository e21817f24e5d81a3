"""The audit log (``client.audit`` of the SDK): ``GET /v1/audit/catalog``,
``GET /v1/audit/events``, ``GET /v1/audit/events/{event_id}``. A user reads
their own events, the admin everyone's; another user's event is a 404."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from kiln.api.deps import CurrentUser, get_services
from kiln.api.errors import validation_error
from kiln.schemas.audit import EventCatalog, EventPage, EventRecord
from kiln.schemas.errors import ErrorMessage
from kiln.services.events.audit import MAX_PAGE, AuditService
from kiln.services.events.catalog import CATALOG, STATUSES
from kiln.store.events import EventFilter
from kiln.store.models import Event

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses={401: {"model": ErrorMessage}})

LIST_PARAMETERS = frozenset(
    {"event_group", "event_type", "status", "user_id", "vm_id", "session_id", "cursor", "limit"}
)
MAX_CURSOR_DIGITS = 18


def get_audit(request: Request) -> AuditService:
    return get_services(request).audit


Audit = Annotated[AuditService, Depends(get_audit)]
Text = Annotated[str | None, Query(max_length=128)]


def record(event: Event) -> EventRecord:
    return EventRecord(
        id=str(event.id),
        event_group=event.event_group,
        event_type=event.event_type,
        status=event.status,
        user_id=event.owner_id,
        actor_type=event.actor_type,
        actor_id=event.actor_id,
        vm_id=event.vm_id,
        session_id=event.session_id,
        resource_type=event.resource_type,
        resource_id=event.resource_id,
        event_payload=event.payload or {},
        error_message=event.error_message,
        created_at=event.created_at,
    )


@router.get("/catalog")
async def catalog(user: CurrentUser, audit: Audit) -> EventCatalog:
    return EventCatalog(catalog=audit.catalog())


@router.get("/events", responses={422: {"description": "a filter or cursor this server does not know"}})
async def list_events(
    request: Request,
    user: CurrentUser,
    audit: Audit,
    event_group: Text = None,
    event_type: Text = None,
    status: Text = None,
    user_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    vm_id: Text = None,
    session_id: Text = None,
    cursor: Text = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> EventPage:
    # A filter this server does not know would otherwise be ignored and the
    # client would read an unfiltered page as a filtered one.
    for name in request.query_params:
        if name not in LIST_PARAMETERS:
            raise validation_error(loc=("query", name), msg=f"unknown filter {name!r}")
    if event_group is not None and event_group not in CATALOG:
        raise validation_error(loc=("query", "event_group"), msg=f"one of {', '.join(sorted(CATALOG))}")
    if status is not None and status not in STATUSES:
        raise validation_error(loc=("query", "status"), msg=f"one of {', '.join(STATUSES)}")
    before = None
    if cursor:
        if not cursor.isdigit() or len(cursor) > MAX_CURSOR_DIGITS:
            raise validation_error(loc=("query", "cursor"), msg="not a cursor of this server (pass next_cursor back)")
        before = int(cursor)
    wanted = EventFilter(event_group, event_type, status, user_id, vm_id, session_id)
    page = await audit.page(user, wanted, before, limit)
    return EventPage(items=[record(event) for event in page.items], next_cursor=page.next_cursor)


@router.get("/events/{event_id}", responses={404: {"model": ErrorMessage}})
async def get_event(event_id: Annotated[int, Path(ge=1, le=2**63 - 1)], user: CurrentUser, audit: Audit) -> EventRecord:
    return record(await audit.get(user, event_id))
