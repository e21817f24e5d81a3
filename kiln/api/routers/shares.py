"""Share routes (API.md, "Networking"; the instavm SDK's ``shares``).

A share's ``url`` is served by the share router (``kiln.router``), not by this
API. Another user's share is 404. ``POST /v1/shares/{id}/link`` makes a signed,
expiring link to a private share (Kiln's own; the SDK does not call it).
"""

from __future__ import annotations

from fastapi import APIRouter

from kiln.api.deps import CurrentUser, Shares
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.shares import (
    ShareCreateRequest,
    ShareDeleted,
    ShareLink,
    ShareLinkRequest,
    ShareRecord,
    ShareUpdateRequest,
)

router = APIRouter(prefix="/v1/shares", tags=["shares"], responses={401: {"model": ErrorMessage}})

NOT_FOUND = error_responses(404, 409)


@router.post("", responses=NOT_FOUND)
async def create_share(body: ShareCreateRequest, user: CurrentUser, shares: Shares) -> ShareRecord:
    return await shares.create(user.id, body)


@router.get("")
async def list_shares(user: CurrentUser, shares: Shares) -> list[ShareRecord]:
    return await shares.list(user.id)


@router.get("/{share_id}", responses=NOT_FOUND)
async def get_share(share_id: str, user: CurrentUser, shares: Shares) -> ShareRecord:
    return await shares.get(user.id, share_id)


@router.patch("/{share_id}", responses=NOT_FOUND)
async def update_share(share_id: str, body: ShareUpdateRequest, user: CurrentUser, shares: Shares) -> ShareRecord:
    return await shares.update(user.id, share_id, body)


@router.delete("/{share_id}", responses=NOT_FOUND)
async def delete_share(share_id: str, user: CurrentUser, shares: Shares) -> ShareDeleted:
    await shares.delete(user.id, share_id)
    return ShareDeleted(share_id=share_id)


@router.post("/{share_id}/link", responses=NOT_FOUND)
async def link_to_share(share_id: str, body: ShareLinkRequest, user: CurrentUser, shares: Shares) -> ShareLink:
    return await shares.link(user.id, share_id, body.expires_in)
