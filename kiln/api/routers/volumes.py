"""Volume routes (API.md, "Volumes") and the VM routes that mount them.

Volumes are per user (another user's is a 404). ``quota_bytes`` is the
filesystem's size (a write past it fails in the guest with "no space");
creating or growing one past the user's disk quota is a 429 naming it;
shrinking below what it holds, or while it is mounted, is a 409; deleting a
mounted volume or a mounted checkpoint is a 409. ``refresh_usage=true``
counts ``used_bytes`` now (else: as last counted).

Files work mounted or not (through the VM that mounts it, or a helper VM);
a path that leads through a symlink or ``..`` is a 400. Downloads are
streamed as ``{"path", "filename", "content": <base64>, "size"}``.

``POST /v1/vms/{vm_id}/volumes`` hot-attaches a volume to a running VM (409
while it is mounted rw elsewhere, or rw is asked while it is mounted at all);
``DELETE /v1/vms/{vm_id}/volumes/{volume_id}`` detaches it (409 while files
are open there). With ``wait=false`` both answer at once and finish in the
background (the mount record's ``status`` tells).
"""

from __future__ import annotations

import posixpath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from kiln.api.deps import CurrentUser, Mounts, VolumeFiles, VolumeServiceDep
from kiln.api.routers.files import BodyDrainingRoute, download_json
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.schemas.snapshots import SuccessResponse
from kiln.schemas.volumes import (
    CheckpointCreateRequest,
    CheckpointRecord,
    MountRecord,
    VmMountRequest,
    VolumeCreateRequest,
    VolumeDownloadRequest,
    VolumeDownloadResponse,
    VolumeFileRecord,
    VolumeRecord,
    VolumeUpdateRequest,
    VolumeUploadResponse,
)
from kiln.services.volumes.files import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT

router = APIRouter(tags=["volumes"], responses={401: {"model": ErrorMessage}}, route_class=BodyDrainingRoute)

NOT_FOUND = error_responses(404)
NOT_FOUND_OR_CONFLICT = error_responses(404, 409)
FILE_ERRORS = error_responses(400, 404, 409, 413, 503, 507)
RefreshUsage = Annotated[bool, Query(description="Count used_bytes now")]
Wait = Annotated[bool, Query(description="Wait until it is done")]


# -- volumes


@router.post("/v1/volumes", responses=error_responses(429))
async def create_volume(body: VolumeCreateRequest, user: CurrentUser, volumes: VolumeServiceDep) -> VolumeRecord:
    return VolumeRecord.from_row(await volumes.create(user.id, body), in_use=False)


@router.get("/v1/volumes")
async def list_volumes(
    user: CurrentUser, volumes: VolumeServiceDep, refresh_usage: RefreshUsage = False
) -> list[VolumeRecord]:
    return [VolumeRecord.from_row(v, in_use) for v, in_use in await volumes.list(user.id, refresh_usage)]


@router.get("/v1/volumes/{volume_id}", responses=NOT_FOUND)
async def get_volume(
    volume_id: str, user: CurrentUser, volumes: VolumeServiceDep, refresh_usage: RefreshUsage = False
) -> VolumeRecord:
    return VolumeRecord.from_row(*await volumes.get(user.id, volume_id, refresh_usage))


@router.patch("/v1/volumes/{volume_id}", responses=error_responses(404, 409, 429))
async def update_volume(
    volume_id: str, body: VolumeUpdateRequest, user: CurrentUser, volumes: VolumeServiceDep
) -> VolumeRecord:
    return VolumeRecord.from_row(*await volumes.update(user.id, volume_id, body))


@router.delete("/v1/volumes/{volume_id}", responses=NOT_FOUND_OR_CONFLICT)
async def delete_volume(volume_id: str, user: CurrentUser, volumes: VolumeServiceDep) -> SuccessResponse:
    await volumes.delete(user.id, volume_id)
    return SuccessResponse()


# -- checkpoints


@router.post("/v1/volumes/{volume_id}/checkpoints", responses=NOT_FOUND_OR_CONFLICT)
async def create_checkpoint(
    volume_id: str, user: CurrentUser, volumes: VolumeServiceDep, body: CheckpointCreateRequest | None = None
) -> CheckpointRecord:
    checkpoint = await volumes.create_checkpoint(user.id, volume_id, body or CheckpointCreateRequest())
    return CheckpointRecord.from_row(checkpoint)


@router.get("/v1/volumes/{volume_id}/checkpoints", responses=NOT_FOUND)
async def list_checkpoints(volume_id: str, user: CurrentUser, volumes: VolumeServiceDep) -> list[CheckpointRecord]:
    return [CheckpointRecord.from_row(c) for c in await volumes.list_checkpoints(user.id, volume_id)]


@router.delete("/v1/volumes/{volume_id}/checkpoints/{checkpoint_id}", responses=NOT_FOUND_OR_CONFLICT)
async def delete_checkpoint(
    volume_id: str, checkpoint_id: str, user: CurrentUser, volumes: VolumeServiceDep
) -> SuccessResponse:
    await volumes.delete_checkpoint(user.id, volume_id, checkpoint_id)
    return SuccessResponse()


# -- files


@router.post("/v1/volumes/{volume_id}/files/upload", responses=FILE_ERRORS)
async def upload_file(
    volume_id: str,
    file: Annotated[UploadFile, File()],
    path: Annotated[str, Form()],
    user: CurrentUser,
    files: VolumeFiles,
    overwrite: Annotated[bool, Form()] = False,
) -> VolumeUploadResponse:
    entry = await files.upload(user.id, volume_id, path, file, overwrite, file.size)
    return VolumeUploadResponse(path=entry.path, size=entry.size)


@router.post(
    "/v1/volumes/{volume_id}/files/download",
    responses={**FILE_ERRORS, 200: {"model": VolumeDownloadResponse, "content": {"application/json": {}}}},
    response_class=StreamingResponse,
)
async def download_file(
    volume_id: str, body: VolumeDownloadRequest, user: CurrentUser, files: VolumeFiles
) -> StreamingResponse:
    download = await files.download(user.id, volume_id, body.path)
    head = {"path": download.path, "filename": posixpath.basename(download.path.rstrip("/"))}
    return StreamingResponse(
        download_json(head, download), media_type="application/json", background=BackgroundTask(download.close)
    )


@router.get("/v1/volumes/{volume_id}/files", responses=FILE_ERRORS)
async def list_files(
    volume_id: str,
    user: CurrentUser,
    files: VolumeFiles,
    prefix: str = "",
    recursive: bool = False,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = DEFAULT_LIST_LIMIT,
) -> list[VolumeFileRecord]:
    return [VolumeFileRecord.from_entry(e) for e in await files.list(user.id, volume_id, prefix, recursive, limit)]


@router.delete("/v1/volumes/{volume_id}/files", responses=FILE_ERRORS)
async def delete_file(
    volume_id: str,
    path: Annotated[str, Query(min_length=1)],
    user: CurrentUser,
    files: VolumeFiles,
    recursive: Annotated[bool, Query(description="Delete a directory and what is in it")] = False,
) -> SuccessResponse:
    await files.delete(user.id, volume_id, path, recursive)
    return SuccessResponse()


# -- mounts in VMs


@router.post("/v1/vms/{vm_id}/volumes", responses=error_responses(404, 409, 503))
async def mount_volume(
    vm_id: str, body: VmMountRequest, user: CurrentUser, mounts: Mounts, wait: Wait = True
) -> MountRecord:
    return MountRecord.from_row(await mounts.mount(user.id, vm_id, body, wait))


@router.get("/v1/vms/{vm_id}/volumes", responses=NOT_FOUND)
async def list_vm_volumes(vm_id: str, user: CurrentUser, mounts: Mounts) -> list[MountRecord]:
    return [MountRecord.from_row(m) for m in await mounts.list(user.id, vm_id)]


@router.delete("/v1/vms/{vm_id}/volumes/{volume_id}", responses=error_responses(404, 409, 503))
async def unmount_volume(
    vm_id: str,
    volume_id: str,
    user: CurrentUser,
    mounts: Mounts,
    mount_path: Annotated[str | None, Query(description="Where it is mounted (needed if at several paths)")] = None,
    wait: Wait = True,
) -> SuccessResponse:
    await mounts.unmount(user.id, vm_id, volume_id, mount_path, wait)
    return SuccessResponse()
