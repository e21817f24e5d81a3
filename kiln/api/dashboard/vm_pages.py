"""The VMs: the live list, create, and the actions on one VM."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response

from kiln.api.dashboard import forms
from kiln.api.dashboard.scope import scope_of
from kiln.api.dashboard.share_pages import shares_of
from kiln.api.dashboard.web import Actor, DashboardRoute, Viewer, page, redirect
from kiln.schemas.vms import VMCreateRequest, VMRecord

if TYPE_CHECKING:
    from kiln.store.models import User, Vm

router = APIRouter(prefix="/ui", route_class=DashboardRoute, include_in_schema=False)

SHAPES = [(256, 1), (512, 1), (1024, 1), (1024, 2), (2048, 2)]
# Statuses that change by themselves: the pages showing them keep polling.
MOVING = frozenset({"creating", "suspending", "resuming", "terminating"})


def ago(moment: datetime, now: datetime) -> str:
    seconds = int((now - moment).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            amount = f"{seconds // size} {unit}"
            break
    else:
        amount = f"{seconds} s"
    return f"in {amount}" if future else f"{amount} ago"


def vm_view(vm: Vm, owner: User | None = None) -> dict[str, Any]:
    """A VM as the pages show it; ``owner``: in an admin's list, whose it is."""
    record = VMRecord.from_row(vm)
    now = datetime.now(UTC)
    created = record.created_at if record.created_at.tzinfo else record.created_at.replace(tzinfo=UTC)
    expires = record.expires_at if record.expires_at.tzinfo else record.expires_at.replace(tzinfo=UTC)
    return {
        "record": record,
        "age": ago(created, now),
        "expires": ago(expires, now),
        "metadata": ", ".join(f"{k}={v}" for k, v in sorted(record.metadata.items())),
        "owner": owner,
    }


async def listed_vms(request: Request, who: Viewer) -> dict[str, Any]:
    """The live VMs of the owners this user may see (the admin: everyone, or the filter's one)."""
    scope = await scope_of(request, who)
    views = [
        vm_view(vm, owner if scope.admin else None)
        for owner in scope.owners
        for vm in await who.services.vms.list(owner.id, True)
    ]
    return {"vms": views, "scope": scope}


@router.get("/")
async def vms_page(request: Request, who: Viewer) -> Response:
    listed = await listed_vms(request, who)
    choices = {"shapes": SHAPES, "vaults": await who.services.vaults.list_vaults(who.user.id)}
    return page(request, "vms.html", {**listed, **choices})


@router.get("/vms/rows")
async def vm_rows(request: Request, who: Viewer) -> Response:
    """The list's rows, which the page polls (htmx) to follow each VM's status."""
    return page(request, "vm_rows.html", await listed_vms(request, who))


@router.post("/vms")
async def create_vm(request: Request, who: Actor) -> Response:
    body = forms.create_request(await request.form())
    # Not waiting: the list shows it creating, then running.
    vm = await who.services.vms.create(who.user.id, body, wait=False)
    return redirect(f"/ui/vms/{vm.id}")


@router.post("/vms/{vm_id}/delete")
async def delete_vm(vm_id: str, who: Actor) -> Response:
    await who.services.vms.terminate(who.user.id, vm_id)
    return redirect("/ui/")


@router.post("/vms/{vm_id}/suspend")
async def suspend_vm(vm_id: str, who: Actor) -> Response:
    await who.services.vms.suspend(who.user.id, vm_id)
    return redirect(f"/ui/vms/{vm_id}")


@router.post("/vms/{vm_id}/resume")
async def resume_vm(vm_id: str, who: Actor) -> Response:
    await who.services.vms.resume(who.user.id, vm_id, wait=False)
    return redirect(f"/ui/vms/{vm_id}")


@router.post("/vms/{vm_id}/snapshot")
async def snapshot_vm(request: Request, vm_id: str, who: Actor) -> Response:
    name = forms.text(await request.form(), "name") or None
    await who.services.snapshots.snapshot_vm(who.user.id, vm_id, name, wait=False)
    return redirect("/ui/snapshots")


@router.post("/vms/{vm_id}/clone")
async def clone_vm(vm_id: str, who: Actor) -> Response:
    clone = await who.services.vms.clone(who.user.id, vm_id, VMCreateRequest(), wait=False)
    return redirect(f"/ui/vms/{clone.id}")


async def vm_with_usage(who: Viewer, vm_id: str) -> dict[str, Any]:
    """The VM's view and its usage (CPU time, resident memory, uptime; read from /proc)."""
    vm = await who.services.vms.get(who.user.id, vm_id)
    view = vm_view(vm)
    usage = await who.services.sessions.usage(who.user.id, vm.session_id)
    if usage.vm.id == vm.id:  # a session's usage is of its newest VM
        view["usage"] = usage
    return view


@router.get("/vms/{vm_id}")
async def vm_page(request: Request, vm_id: str, who: Viewer) -> Response:
    view = await vm_with_usage(who, vm_id)
    return page(request, "vm.html", {"vm": view, "shares": await shares_of(who, vm_id)})


@router.get("/vms/{vm_id}/record")
async def vm_record(request: Request, vm_id: str, who: Viewer) -> Response:
    return page(request, "vm_record.html", {"vm": await vm_with_usage(who, vm_id)})


@router.get("/vms/{vm_id}/console")
async def vm_console(request: Request, vm_id: str, who: Viewer) -> Response:
    tail = await who.services.vms.console_tail(who.user.id, vm_id, 16 * 1024)
    return page(request, "console.html", {"console": tail})
