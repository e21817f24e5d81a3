"""Wire models of the snapshot routes (API.md, "Snapshots" and the VM routes
snapshot / clone / suspend / resume)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel

from kiln.schemas.bodies import RequestBody


class SnapshotRow(Protocol):
    """What a snapshot record is built from (``kiln.store.models.Snapshot``)."""

    id: str
    owner_id: int | None
    name: str | None
    status: str
    type: str
    vcpu_count: int
    memory_mb: int
    size_bytes: int
    source_vm_id: str | None
    parent_id: str | None
    failure_reason: str | None
    build_log: str | None
    created_at: datetime


class SnapshotRecord(BaseModel):
    # Both names of the id, as InstaVM answers.
    snapshot_id: str
    id: str
    name: str | None
    status: str  # creating, ready, failed
    type: str  # user, auto, base, system
    # Base and system snapshots: every user lists them and creates VMs from them.
    is_public: bool
    vcpu_count: int
    memory_mb: int
    size_bytes: int
    source_vm_id: str | None
    # The snapshot whose disk this one's is written on top of (it cannot go first).
    parent_id: str | None
    failure_reason: str | None
    # The SDK's wait for a build reads the reason of a failure as ``error``.
    error: str | None
    # A build's progress (build_args): each step as it starts, with its output's tail.
    build_log: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, snapshot: SnapshotRow) -> SnapshotRecord:
        return cls(
            snapshot_id=snapshot.id,
            id=snapshot.id,
            name=snapshot.name,
            status=snapshot.status,
            type=snapshot.type,
            is_public=snapshot.owner_id is None,
            vcpu_count=snapshot.vcpu_count,
            memory_mb=snapshot.memory_mb,
            size_bytes=snapshot.size_bytes,
            source_vm_id=snapshot.source_vm_id,
            parent_id=snapshot.parent_id,
            failure_reason=snapshot.failure_reason,
            error=snapshot.failure_reason,
            build_log=snapshot.build_log,
            created_at=snapshot.created_at,
        )


class VMSnapshotRequest(RequestBody):
    """POST /v1/vms/{vm_id}/snapshot."""

    name: str | None = None


class SnapshotImportRequest(RequestBody):
    """POST /v1/snapshots: a snapshot imported from an OCI image, or built on
    an image variant of this server.

    ``oci_image``: an OCI image layout directory on the server, or a registry
    reference; its ``build_args``: ``env`` (added to the image's Env),
    ``workdir`` (instead of its WorkingDir), ``free_space_mb`` (room on the
    disk, default 512). Or the name of an image variant (``default``, ``node``):
    a build in a builder VM, whose ``build_args`` are those of
    ``kiln.services.snapshots.build_plan``.
    ``type``: ``user`` (default) or ``auto``."""

    oci_image: str
    name: str | None = None
    vcpu_count: int | None = None
    memory_mb: int | None = None
    build_args: dict[str, Any] | None = None
    type: str | None = None


class SystemSnapshotRequest(RequestBody):
    """POST /v1/system-snapshots (the operator's): publish, for every user, a
    copy of ``snapshot_id`` (one of the admin's snapshots) or of the base
    snapshot of ``image_variant`` in a shape (``memory_mb``, ``vcpu_count``:
    the server's defaults if left out)."""

    snapshot_id: str | None = None
    image_variant: str | None = None
    memory_mb: int | None = None
    vcpu_count: int | None = None
    name: str | None = None


class SuccessResponse(BaseModel):
    success: bool = True
