"""Whose resources a list page shows: the signed-in user's, or for the admin
everyone's (``?user=<id>``: one user's). The rule is the services'
(``UserService.visible_owners``); this only reads the filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from kiln.api.dashboard.web import PageError, Viewer
from kiln.services.events.audit import is_admin

if TYPE_CHECKING:
    from kiln.store.models import User

MAX_USER_ID = 2**63 - 1


@dataclass(frozen=True)
class Scope:
    admin: bool
    owners: list[User]  # whose resources are listed
    users: list[User]  # the filter's choices (the admin's only)
    only: int | None  # the filter's user id, if one is chosen

    def query(self) -> str:
        """The filter as a query string, for the fragments a page polls."""
        return f"?user={self.only}" if self.only is not None else ""


def user_filter(request: Request) -> int | None:
    raw = request.query_params.get("user", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_USER_ID:
        raise PageError("user: choose a user from the list", 422)
    return int(raw)


async def scope_of(request: Request, who: Viewer) -> Scope:
    only = user_filter(request)
    users = who.services.users
    owners = await users.visible_owners(who.user, only)
    if not is_admin(who.user):
        return Scope(False, owners, [], None)
    return Scope(True, owners, await users.visible_owners(who.user), only)
