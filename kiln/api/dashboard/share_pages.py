"""A VM's shares on its page: listed with their URLs, made, revoked (for good).

A private share's URL asks its visitor to be this user (or to hold a signed
link, which the API's ``POST /v1/shares/{id}/link`` makes); a public one does not.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard import forms
from kiln.api.dashboard.web import Actor, DashboardRoute, PageError, Viewer, redirect
from kiln.schemas.shares import ShareCreateRequest, ShareRecord, ShareUpdateRequest

router = APIRouter(prefix="/ui", route_class=DashboardRoute, include_in_schema=False)


async def shares_of(who: Viewer, vm_id: str) -> list[ShareRecord]:
    """The VM's shares, newest first (revoked ones too: their URLs answer 404 now)."""
    return list(reversed(await who.services.shares.list(who.user.id, vm_id)))


@router.post("/vms/{vm_id}/shares")
async def create_share(request: Request, vm_id: str, who: Actor) -> Response:
    form = await request.form()
    port = forms.optional_int(form, "port", "port")
    if port is None:
        raise PageError("port: name the port in the VM to share", 422)
    is_public = form.get("is_public") == "on"
    await who.services.shares.create(who.user.id, ShareCreateRequest(port=port, is_public=is_public, vm_id=vm_id))
    return redirect(f"/ui/vms/{vm_id}#shares-title")


@router.post("/shares/{share_id}/revoke")
async def revoke_share(share_id: str, who: Actor) -> Response:
    share = await who.services.shares.update(who.user.id, share_id, ShareUpdateRequest(revoke=True))
    return redirect(f"/ui/vms/{share.vm_id}#shares-title")
