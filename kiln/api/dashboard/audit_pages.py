"""The audit events, newest first, a page at a time (the API's ``/v1/audit/events``
cursor: the id of a page's last event). A user reads their own events; the admin
everyone's, or one user's with the filter (``AuditService`` decides)."""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard.scope import user_filter
from kiln.api.dashboard.web import DashboardRoute, PageError, Viewer, page
from kiln.services.events.audit import EventFilter, is_admin
from kiln.services.events.catalog import CATALOG, STATUSES

router = APIRouter(prefix="/ui", route_class=DashboardRoute, include_in_schema=False)

PAGE_SIZE = 50
MAX_CURSOR_DIGITS = 18


def chosen(request: Request, name: str, allowed: Collection[str]) -> str | None:
    value = request.query_params.get(name, "").strip()
    if not value:
        return None
    if value not in allowed:
        raise PageError(f"{name.replace('_', ' ')}: choose one from the list", 422)
    return value


@router.get("/audit")
async def audit_page(request: Request, who: Viewer) -> Response:
    group = chosen(request, "event_group", CATALOG)
    status = chosen(request, "status", STATUSES)
    cursor = request.query_params.get("cursor", "").strip()
    if cursor and (not cursor.isdigit() or len(cursor) > MAX_CURSOR_DIGITS):
        raise PageError("cursor: not one of this dashboard's pages", 422)
    admin = is_admin(who.user)
    only = user_filter(request) if admin else None
    wanted = EventFilter(event_group=group, status=status, user_id=only)
    found = await who.services.audit.page(who.user, wanted, int(cursor) if cursor else None, PAGE_SIZE)
    kept = {"event_group": group, "status": status, "user": only}
    filters = {name: value for name, value in kept.items() if value is not None}
    older = f"/ui/audit?{urlencode({**filters, 'cursor': found.next_cursor})}" if found.next_cursor else None
    users = await who.services.users.visible_owners(who.user) if admin else []
    context = {
        "events": found.items,
        "older": older,
        "newest": f"/ui/audit?{urlencode(filters)}" if cursor else None,
        "groups": sorted(CATALOG),
        "statuses": STATUSES,
        "filters": filters,
        "admin": admin,
        "users": users,
        "names": {user.id: user.username for user in users},
    }
    return page(request, "audit.html", context)
