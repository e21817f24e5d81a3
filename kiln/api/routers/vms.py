"""VM routes (API.md, "VMs").

``POST /v1/vms`` with ``wait=true`` answers 200 with ``status: running`` once the
guest is ready. If the VM fails on the way it is recorded as ``failed`` (see
``GET /v1/vms/{vm_id}`` for its ``failure_reason``) and the answer is 503 with a
``detail`` naming the VM and the reason. A full host or an image that is not
built is also 503, before anything starts. With ``wait=false`` the answer comes
at once with ``status: creating`` (and ``env_status: pending`` when env was
given); the VM continues booting in the background.

``GET /v1/vms`` lists live VMs (creating, running, suspended); ``GET /v1/vms/``
(trailing slash, as InstaVM) lists every record, terminated ones included.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from kiln.api.deps import CurrentUser, SshEndpoint, Vms
from kiln.api.errors import validation_error
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.vms import (
    VMConsoleResponse,
    VMCreateRequest,
    VMCreateResponse,
    VMDeleteResponse,
    VMRecord,
    VMUpdateRequest,
)

router = APIRouter(prefix="/v1/vms", tags=["vms"])

NOT_FOUND = error_responses(404)
MAX_CONSOLE_TAIL_BYTES = 1024 * 1024


def metadata_filter(
    metadata: Annotated[
        str | None,
        Query(description="JSON object: only VMs whose metadata contains these pairs"),
    ] = None,
) -> dict[str, Any] | None:
    if metadata is None:
        return None
    try:
        wanted = json.loads(metadata)
    except ValueError:
        wanted = None
    if not isinstance(wanted, dict):
        raise validation_error(loc=("query", "metadata"), msg="must be a JSON object")
    return wanted


MetadataFilter = Annotated[dict[str, Any] | None, Depends(metadata_filter)]


# The seed documents exactly these responses (200 and 422) for this route.
@router.post("")
async def create_vm(
    body: VMCreateRequest,
    user: CurrentUser,
    vms: Vms,
    wait: Annotated[bool, Query(description="Wait for VM to be provisioned")] = True,
) -> VMCreateResponse:
    vm = await vms.create(user.id, body, wait=wait)
    return VMCreateResponse.from_row(vm)


@router.get("")
async def list_live_vms(
    user: CurrentUser, vms: Vms, metadata: MetadataFilter, ssh: SshEndpoint
) -> list[VMRecord]:
    return [VMRecord.from_row(vm, ssh) for vm in await vms.list(user.id, True, metadata)]


@router.get("/")
async def list_all_vms(user: CurrentUser, vms: Vms, metadata: MetadataFilter, ssh: SshEndpoint) -> list[VMRecord]:
    return [VMRecord.from_row(vm, ssh) for vm in await vms.list(user.id, False, metadata)]


@router.get("/{vm_id}", responses=NOT_FOUND)
async def get_vm(vm_id: str, user: CurrentUser, vms: Vms, ssh: SshEndpoint) -> VMRecord:
    return VMRecord.from_row(await vms.get(user.id, vm_id), ssh)


@router.patch("/{vm_id}", responses={**NOT_FOUND, 409: {"model": ErrorMessage}})
async def update_vm(
    vm_id: str, body: VMUpdateRequest, user: CurrentUser, vms: Vms, ssh: SshEndpoint
) -> VMRecord:
    return VMRecord.from_row(await vms.update(user.id, vm_id, body), ssh)


@router.delete("/{vm_id}", responses={**NOT_FOUND, 409: {"model": ErrorMessage}})
async def delete_vm(vm_id: str, user: CurrentUser, vms: Vms) -> VMDeleteResponse:
    vm = await vms.terminate(user.id, vm_id)
    return VMDeleteResponse(vm_id=vm.id, status=vm.status, snapshot_id=vm.terminate_snapshot_id)


@router.get("/{vm_id}/console", responses=NOT_FOUND)
async def read_console(
    vm_id: str,
    user: CurrentUser,
    vms: Vms,
    tail_bytes: Annotated[int, Query(ge=1, le=MAX_CONSOLE_TAIL_BYTES)] = 64 * 1024,
) -> VMConsoleResponse:
    """The last ``tail_bytes`` of the VM's serial console (empty once its files are gone)."""
    return VMConsoleResponse(vm_id=vm_id, output=await vms.console_tail(user.id, vm_id, tail_bytes))
