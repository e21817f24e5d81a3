"""Wire models of the share routes (API.md, "Networking"; the instavm SDK's ``shares``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody


class ShareCreateRequest(RequestBody):
    """POST /v1/shares: one of ``vm_id`` or ``session_id`` names the VM (both: they must agree)."""

    port: int = Field(ge=1, le=65535)
    is_public: bool = False
    vm_id: str | None = None
    session_id: str | None = None


class ShareUpdateRequest(RequestBody):
    """PATCH /v1/shares/{id}: ``revoke: true`` ends the share for good (the router answers 404)."""

    is_public: bool | None = None
    revoke: bool | None = None


class ShareLinkRequest(RequestBody):
    """POST /v1/shares/{id}/link: a signed link to a private share, valid this long."""

    expires_in: int | None = Field(default=None, ge=1)


class ShareRecord(BaseModel):
    share_id: str
    id: str
    vm_id: str
    port: int
    is_public: bool
    url: str
    status: str  # active or revoked
    created_at: datetime
    revoked_at: datetime | None = None


class ShareLink(BaseModel):
    share_id: str
    url: str
    expires_at: datetime


class AppUrl(BaseModel):
    """GET /v1/sessions/app-url/{sid}: the share of that port (made private if there was none)."""

    url: str
    share_id: str
    port: int
    is_public: bool


class ShareDeleted(BaseModel):
    success: bool = True
    share_id: str
