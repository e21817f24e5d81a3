"""What every ``POST /v1/snapshots`` body is checked for, import or build (the
shape, the type and the name), and the ``creating`` row every snapshot made
from a request starts as (imports, builds, system snapshots)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.runtime.snapshots import Shape
from kiln.schemas.snapshots import SnapshotImportRequest
from kiln.services.errors import FieldProblem
from kiln.services.snapshots.rows import check_snapshot_quota, new_snapshot_id, now
from kiln.services.states import SnapshotStatus, SnapshotType
from kiln.services.vm_policy import MAX_SNAPSHOT_NAME_LENGTH
from kiln.store.models import Snapshot
from kiln.store.repositories import SnapshotRepository

CREATE_TYPES = (SnapshotType.USER, SnapshotType.AUTO, SnapshotType.SYSTEM)


def check_basics(
    request: SnapshotImportRequest, settings: Settings, problems: list[FieldProblem]
) -> tuple[Shape, SnapshotType]:
    """The snapshot's shape (the server's defaults within its limits) and type
    (``user`` unless ``auto``; ``system`` is the operator's and is made as a
    ``staging`` row that ``system_builds`` publishes); each problem is added
    to ``problems``."""

    def within(field: str, value: int | None, default: int, low: int, high: int) -> int:
        if value is None:
            return default
        if not low <= value <= high:
            problems.append(FieldProblem((field,), f"must be between {low} and {high}"))
        return value

    memory_mb = within(
        "memory_mb", request.memory_mb, settings.default_memory_mb, settings.min_memory_mb, settings.vm_max_memory_mb
    )
    vcpu_count = within("vcpu_count", request.vcpu_count, settings.default_vcpu_count, 1, settings.vm_max_vcpus)
    snapshot_type = SnapshotType.USER
    if request.type is not None:
        if request.type not in CREATE_TYPES:
            problems.append(FieldProblem(("type",), f"must be one of {', '.join(CREATE_TYPES)}"))
        else:
            snapshot_type = SnapshotType(request.type)
            if snapshot_type == SnapshotType.SYSTEM:
                snapshot_type = SnapshotType.STAGING
    name = request.name
    if name is not None and (not 1 <= len(name) <= MAX_SNAPSHOT_NAME_LENGTH or not name.isprintable()):
        problems.append(FieldProblem(("name",), f"must be 1-{MAX_SNAPSHOT_NAME_LENGTH} printable characters"))
    return Shape(memory_mb, vcpu_count), snapshot_type


async def add_creating(
    session: AsyncSession,
    settings: Settings,
    owner_id: int | None,
    name: str | None,
    checked: tuple[Shape, SnapshotType],
    image_variant: str,
    **columns: Any,
) -> Snapshot:
    """A new snapshot row, ``creating``: a user's within their snapshot quota,
    or (``owner_id`` None) a system snapshot, which counts against no one's."""
    shape, snapshot_type = checked
    if owner_id is not None:
        await check_snapshot_quota(session, owner_id, settings.quota_snapshots)
    snapshot_id = new_snapshot_id()
    return await SnapshotRepository(session).add(
        Snapshot(
            id=snapshot_id,
            owner_id=owner_id,
            name=name,
            type=snapshot_type,
            status=SnapshotStatus.CREATING,
            vcpu_count=shape.vcpu_count,
            memory_mb=shape.memory_mb,
            image_variant=image_variant,
            size_bytes=0,
            directory=str((settings.snapshots_dir / snapshot_id).resolve()),
            created_at=now(),
            **columns,
        )
    )
