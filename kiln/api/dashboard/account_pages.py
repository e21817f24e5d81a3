"""Snapshots, API keys and the host."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard import forms
from kiln.api.dashboard.scope import scope_of
from kiln.api.dashboard.web import Actor, DashboardRoute, PageError, Viewer, page, redirect
from kiln.api.routers.health import healthz
from kiln.schemas.snapshots import SnapshotRecord
from kiln.services.host_status import HostStatus

router = APIRouter(prefix="/ui", route_class=DashboardRoute, include_in_schema=False)
MAX_KEY_ID = 2**63 - 1


async def _snapshot_rows(request: Request, who: Viewer) -> dict[str, Any]:
    """The snapshots of the owners this user may see, each once (every owner's
    list holds the base snapshots), with its owner's name (None: a base one)."""
    scope = await scope_of(request, who)
    rows: dict[str, dict[str, Any]] = {}
    for owner in scope.owners:
        for snapshot in await who.services.snapshots.list(owner.id, None):
            record = SnapshotRecord.from_row(snapshot)
            rows.setdefault(record.id, {"s": record, "owner": None if record.type == "base" else owner})
    return {"snapshots": list(rows.values()), "scope": scope}


@router.get("/snapshots")
async def snapshots_page(request: Request, who: Viewer) -> Response:
    return page(request, "snapshots.html", await _snapshot_rows(request, who))


@router.get("/snapshots/rows")
async def snapshot_rows(request: Request, who: Viewer) -> Response:
    return page(request, "snapshot_rows.html", await _snapshot_rows(request, who))


@router.post("/snapshots/{snapshot_id}/vms")
async def vm_from_snapshot(request: Request, snapshot_id: str, who: Actor) -> Response:
    await who.services.snapshots.get(who.user.id, snapshot_id)  # 404 before anything starts
    body = forms.create_request(await request.form(), snapshot_id=snapshot_id)
    vm = await who.services.vms.create(who.user.id, body, wait=False)
    return redirect(f"/ui/vms/{vm.id}")


@router.post("/snapshots/{snapshot_id}/delete")
async def delete_snapshot(snapshot_id: str, who: Actor) -> Response:
    await who.services.snapshots.delete(who.user.id, snapshot_id)
    return redirect("/ui/snapshots")


async def _keys_page(request: Request, who: Viewer, created: str | None = None, status: int = 200) -> Response:
    keys = await who.services.users.list_api_keys(who.user.id)
    return page(request, "keys.html", {"user": who.user, "keys": keys, "created": created}, status)


@router.get("/keys")
async def keys_page(request: Request, who: Viewer) -> Response:
    return await _keys_page(request, who)


@router.post("/keys")
async def create_key(request: Request, who: Actor) -> Response:
    name = forms.text(await request.form(), "name") or None
    if name is not None and len(name) > 200:
        raise PageError("a key's name is at most 200 characters", 422)
    created = await who.services.users.create_api_key(who.user.id, name)
    # The one time the key is shown: in this answer (never stored in a page that is
    # cached, nor in a URL), not on any later visit.
    return await _keys_page(request, who, created=created.key)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: int, who: Actor) -> Response:
    if not 1 <= key_id <= MAX_KEY_ID:
        raise PageError("no such key", 404)
    await who.services.users.delete_api_key(who.user.id, key_id)
    return redirect("/ui/keys")


@router.get("/host")
async def host_page(request: Request, who: Viewer) -> Response:
    capacity = await HostStatus(who.services.vms, request.app.state.dashboard_settings).capacity(who.user.id)
    health = await healthz(request)
    return page(request, "host.html", {"user": who.user, "capacity": capacity, "health": health})
