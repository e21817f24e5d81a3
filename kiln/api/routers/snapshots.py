"""Snapshot routes, and the VM routes that save or restore VMs (API.md).

``POST /v1/vms/{vm_id}/snapshot`` saves a running VM, which keeps running; with
``wait=false`` the record comes back ``creating``. ``clone`` snapshots the VM and
creates a new VM from that snapshot (the body takes create fields; its
``snapshot_name`` names the snapshot). ``suspend`` saves the VM and stops its
process; ``resume`` restores it under the same ``vm_id``.

Snapshots are per user (another user's is a 404); base snapshots (one per image
and shape, what new VMs are restored from) are listed for everyone and cannot be
deleted here (409). System snapshots are published by the operator
(``POST /v1/system-snapshots`` with the admin's key, ``kiln images publish``):
listed for everyone (``?type=system``), usable by everyone, deleted by no one
here (403; the operator's ``DELETE /v1/system-snapshots/{id}``). Deleting a
snapshot that a VM or another snapshot still builds on is a 409.

``POST /v1/snapshots`` answers at once with the record ``creating`` (the SDK
cannot pass ``wait``, and a pull or a build outlasts its timeout); polling
``GET /v1/snapshots/{id}`` sees it end ``ready``, or ``failed`` with the reason
(``failure_reason``, also as ``error``). It imports an OCI image (a local image
layout or a registry reference): a body the server cannot use (no such layout,
a registry it does not pull from) is a 422 on ``oci_image``, and with
``wait=true`` a problem of the image itself (no python3, a digest mismatch, an
unreachable registry) is one too. Or, when ``oci_image`` names an image
variant (``default``, ``node``), it builds on it from ``build_args``
(``kiln.services.snapshots.builds``), the progress in ``build_log``; ``wait``
does not apply to builds. With ``type: system`` and the admin's key (403 for
anyone else) the build or import ends as a system snapshot
(``kiln.services.snapshots.system_builds``); ``POST /v1/system-snapshots``
takes ``wait`` too (default true; false: answered ``creating``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kiln.api.deps import (
    Builder,
    CurrentUser,
    Importer,
    Snapshots,
    SshEndpoint,
    SystemBuildsDep,
    SystemSnapshotsDep,
    Vms,
)
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.snapshots import (
    SnapshotImportRequest,
    SnapshotRecord,
    SuccessResponse,
    SystemSnapshotRequest,
    VMSnapshotRequest,
)
from kiln.schemas.vms import VMCreateRequest, VMCreateResponse, VMRecord
from kiln.services.states import SnapshotType

router = APIRouter(tags=["snapshots"])

NOT_FOUND = error_responses(404)
NOT_FOUND_OR_CONFLICT = error_responses(404, 409)
FORBIDDEN_NOT_FOUND_OR_CONFLICT = error_responses(403, 404, 409)
Wait = Annotated[bool, Query(description="Wait until it is done")]


@router.post("/v1/vms/{vm_id}/snapshot", responses=NOT_FOUND_OR_CONFLICT)
async def snapshot_vm(
    vm_id: str,
    user: CurrentUser,
    snapshots: Snapshots,
    body: VMSnapshotRequest | None = None,
    wait: Wait = True,
) -> SnapshotRecord:
    name = body.name if body else None
    snapshot = await snapshots.snapshot_vm(user.id, vm_id, name, wait)
    return SnapshotRecord.from_row(snapshot)


@router.post("/v1/vms/{vm_id}/clone", responses=NOT_FOUND_OR_CONFLICT)
async def clone_vm(
    vm_id: str,
    user: CurrentUser,
    vms: Vms,
    body: VMCreateRequest | None = None,
    wait: Wait = True,
) -> VMCreateResponse:
    vm = await vms.clone(user.id, vm_id, body or VMCreateRequest(), wait)
    return VMCreateResponse.from_row(vm)


@router.post("/v1/vms/{vm_id}/suspend", responses=NOT_FOUND_OR_CONFLICT)
async def suspend_vm(vm_id: str, user: CurrentUser, vms: Vms, ssh: SshEndpoint) -> VMRecord:
    return VMRecord.from_row(await vms.suspend(user.id, vm_id), ssh)


@router.post("/v1/vms/{vm_id}/resume", responses=NOT_FOUND_OR_CONFLICT)
async def resume_vm(vm_id: str, user: CurrentUser, vms: Vms, ssh: SshEndpoint, wait: Wait = True) -> VMRecord:
    return VMRecord.from_row(await vms.resume(user.id, vm_id, wait), ssh)


@router.get("/v1/snapshots")
async def list_snapshots(
    user: CurrentUser,
    snapshots: Snapshots,
    type: Annotated[str | None, Query(description="user, auto, base or system")] = None,
) -> list[SnapshotRecord]:
    return [SnapshotRecord.from_row(snapshot) for snapshot in await snapshots.list(user.id, type)]


@router.post("/v1/snapshots", responses={403: {"model": ErrorMessage}, 503: {"model": ErrorMessage}})
async def create_snapshot(
    body: SnapshotImportRequest,
    user: CurrentUser,
    importer: Importer,
    builder: Builder,
    system: SystemBuildsDep,
    wait: Wait = False,
) -> SnapshotRecord:
    """A snapshot imported from an OCI image (a local OCI image layout directory
    or a registry reference, pulled when the server can reach the registry),
    or built on an image variant from ``build_args`` (packages, a clone, commands,
    ``envs``; ``disk_size_gb`` grows the root disk to that many GiB first); with
    ``type: system`` (the operator's) published for every user once done."""
    if body.type == SnapshotType.SYSTEM:
        snapshot = await system.create(user, body, wait)
    elif builder.builds_on(body.oci_image):
        snapshot = await builder.build(user.id, body)
    else:
        snapshot = await importer.import_image(user.id, body, wait)
    return SnapshotRecord.from_row(snapshot)


@router.get("/v1/snapshots/{snapshot_id}", responses=NOT_FOUND)
async def get_snapshot(snapshot_id: str, user: CurrentUser, snapshots: Snapshots) -> SnapshotRecord:
    return SnapshotRecord.from_row(await snapshots.get(user.id, snapshot_id))


@router.delete("/v1/snapshots/{snapshot_id}", responses=FORBIDDEN_NOT_FOUND_OR_CONFLICT)
async def delete_snapshot(snapshot_id: str, user: CurrentUser, snapshots: Snapshots) -> SuccessResponse:
    await snapshots.delete(user.id, snapshot_id)
    return SuccessResponse()


@router.post("/v1/system-snapshots", responses=FORBIDDEN_NOT_FOUND_OR_CONFLICT)
async def publish_system_snapshot(
    body: SystemSnapshotRequest, user: CurrentUser, system: SystemSnapshotsDep, wait: Wait = True
) -> SnapshotRecord:
    """The operator's: a snapshot for every user, copied from one of the admin's
    snapshots or from an image variant's base snapshot (``wait=false``: answered
    ``creating``, copied in the background)."""
    return SnapshotRecord.from_row(await system.publish(user, body, wait))


@router.delete("/v1/system-snapshots/{snapshot_id}", responses=FORBIDDEN_NOT_FOUND_OR_CONFLICT)
async def unpublish_system_snapshot(
    snapshot_id: str, user: CurrentUser, system: SystemSnapshotsDep
) -> SuccessResponse:
    await system.unpublish(user, snapshot_id)
    return SuccessResponse()
