"""Wire models of the volume routes (API.md, "Volumes", and the VM mount
routes). Requests refuse fields they do not know (422 naming them): a client
must never believe a setting took effect when Kiln has no such setting."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel

from kiln.schemas.bodies import RequestBody


class VolumeCreateRequest(RequestBody):
    name: str
    quota_bytes: int


class VolumeUpdateRequest(RequestBody):
    """PATCH /v1/volumes/{id}: fields left out (or null) stay as they are."""

    name: str | None = None
    quota_bytes: int | None = None


class VolumeRow(Protocol):
    id: str
    name: str
    quota_bytes: int
    used_bytes: int
    created_at: datetime
    updated_at: datetime


class VolumeRecord(BaseModel):
    # Both names of the id, as InstaVM answers.
    volume_id: str
    id: str
    name: str
    quota_bytes: int
    used_bytes: int
    status: str  # ready, or in_use while a VM mounts it
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, volume: VolumeRow, in_use: bool) -> VolumeRecord:
        return cls(
            volume_id=volume.id,
            id=volume.id,
            name=volume.name,
            quota_bytes=volume.quota_bytes,
            used_bytes=volume.used_bytes,
            status="in_use" if in_use else "ready",
            created_at=volume.created_at,
            updated_at=volume.updated_at,
        )


class CheckpointCreateRequest(RequestBody):
    name: str | None = None


class CheckpointRow(Protocol):
    id: str
    volume_id: str
    name: str | None
    size_bytes: int
    created_at: datetime


class CheckpointRecord(BaseModel):
    checkpoint_id: str
    id: str
    volume_id: str
    name: str | None
    status: str
    size_bytes: int
    created_at: datetime

    @classmethod
    def from_row(cls, checkpoint: CheckpointRow) -> CheckpointRecord:
        return cls(
            checkpoint_id=checkpoint.id,
            id=checkpoint.id,
            volume_id=checkpoint.volume_id,
            name=checkpoint.name,
            status="ready",
            size_bytes=checkpoint.size_bytes,
            created_at=checkpoint.created_at,
        )


class FileEntryRow(Protocol):
    """A file as the volume mechanism lists it (``kiln.volumes.FileEntry``)."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def is_dir(self) -> bool: ...
    @property
    def kind(self) -> str: ...
    @property
    def modified_at(self) -> float: ...  # seconds since the epoch


class VolumeFileRecord(BaseModel):
    path: str  # relative to the volume's root
    size: int
    is_dir: bool
    kind: str  # file, dir, symlink or other
    modified_at: datetime

    @classmethod
    def from_entry(cls, entry: FileEntryRow) -> VolumeFileRecord:
        return cls(
            path=entry.path, size=entry.size, is_dir=entry.is_dir, kind=entry.kind,
            modified_at=datetime.fromtimestamp(entry.modified_at, UTC),
        )  # fmt: skip


class VolumeUploadResponse(BaseModel):
    success: bool = True
    path: str
    size: int


class VolumeDownloadRequest(RequestBody):
    path: str


class VolumeDownloadResponse(BaseModel):
    path: str
    filename: str  # the file's name, as the SDK saves it
    content: str  # base64
    size: int


class VmMountRequest(RequestBody):
    """POST /v1/vms/{vm_id}/volumes (the fields of a create's ``volumes`` entry)."""

    volume_id: str
    mount_path: str
    mode: str = "rw"
    checkpoint_id: str | None = None


class MountRow(Protocol):
    vm_id: str
    volume_id: str
    mount_path: str
    mode: str
    checkpoint_id: str | None
    status: str
    failure_reason: str | None
    created_at: datetime


class MountRecord(BaseModel):
    vm_id: str
    volume_id: str
    mount_path: str
    mode: str
    checkpoint_id: str | None
    status: str  # attaching, mounted, detaching, failed
    failure_reason: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, mount: MountRow) -> MountRecord:
        return cls(
            vm_id=mount.vm_id,
            volume_id=mount.volume_id,
            mount_path=mount.mount_path,
            mode=mount.mode,
            checkpoint_id=mount.checkpoint_id,
            status=mount.status,
            failure_reason=mount.failure_reason,
            created_at=mount.created_at,
        )


def mount_summary(mount: MountRow) -> dict[str, Any]:
    """A mount as the VM record lists it (``VMRecord.volumes``)."""
    return {
        "volume_id": mount.volume_id,
        "mount_path": mount.mount_path,
        "mode": mount.mode,
        "checkpoint_id": mount.checkpoint_id,
        "status": mount.status,
    }
