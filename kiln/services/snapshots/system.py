"""System snapshots: what the operator publishes for every user.

``POST /v1/system-snapshots`` (the admin's key; ``kiln images publish``) makes
one from an image variant (its base snapshot of a shape, booted once if it is
not cached) or from one of the admin's own snapshots. Either way the new
snapshot is a copy of the save (``Node.copy_saved``) whose disk stands on the
image alone: the admin may delete the source afterwards, and the source's
chain never grows a public child. It has no owner, so every user lists it
(``GET /v1/snapshots?type=system``), gets it and creates VMs from it; deleting
it through ``DELETE /v1/snapshots/{id}`` is a 403 for everyone
(``SnapshotService.delete``): the operator removes it with
``DELETE /v1/system-snapshots/{id}``, refused (409) while a VM or snapshot
builds on it.

The row is made by ``reserve`` (``requests.add_creating``, as every snapshot
made from a request) and filled by ``fill``; ``publish`` does both, waiting or
(``wait=false``) in the background. ``system_builds`` uses the same two for a
build or import published through ``POST /v1/snapshots`` with ``type: system``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from kiln.config import Settings
from kiln.node.node import Node
from kiln.runtime.errors import RuntimeFailure
from kiln.runtime.snapshots import Shape, directory_size
from kiln.schemas.snapshots import SystemSnapshotRequest
from kiln.services.background import BackgroundTasks
from kiln.services.disk_budget import DiskBudget
from kiln.services.errors import (
    Conflict,
    FieldProblem,
    Forbidden,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    VmStartFailed,
)
from kiln.services.events.audit import is_admin
from kiln.services.events.record import by_user, snapshot_event
from kiln.services.events.record import record as record_event
from kiln.services.snapshots.requests import add_creating
from kiln.services.snapshots.restore import RestorePlanner
from kiln.services.snapshots.rows import record, reload
from kiln.services.snapshots.service import SnapshotService
from kiln.services.states import LISTED_TYPES, SnapshotStatus, SnapshotType
from kiln.services.vm_policy import MAX_SNAPSHOT_NAME_LENGTH
from kiln.services.vms import ImageSource
from kiln.store.db import Database
from kiln.store.models import Snapshot, User
from kiln.store.repositories import SnapshotRepository

log = logging.getLogger(__name__)

OPERATOR_ONLY = "publishing and removing system snapshots is the operator's: use the admin's API key"


class SystemSnapshots:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        node: Node,
        images: ImageSource,
        planner: RestorePlanner,
        snapshots: SnapshotService,
        disk: DiskBudget,
        background: BackgroundTasks,
    ) -> None:
        self._settings = settings
        self._db = db
        self._node = node
        self._images = images
        self._planner = planner
        self._snapshots = snapshots
        self._disk = disk
        self._background = background

    async def publish(self, user: User, request: SystemSnapshotRequest, wait: bool = True) -> Snapshot:
        """A new system snapshot: ``ready`` (or ``failed`` with the reason if the
        copy failed), or with ``wait`` false ``creating``, copied in the background."""
        if not is_admin(user):
            raise Forbidden(OPERATOR_ONLY)
        source, name = await self._source(user, request)
        snapshot = await self.reserve(user, name, source, published_from=source.id)
        copy = self.fill(snapshot.id, source)
        if not wait:
            self._background.run(copy, f"publish {snapshot.id}")
            return snapshot
        await copy
        return await reload(self._db, snapshot.id)

    async def check_name(self, name: str | None) -> None:
        """409 if a system snapshot that is not ``failed`` has that name already
        (the SDK's cookbooks and templates find them by name; a failed one
        does not keep the name from a retry)."""
        async with self._db.transaction() as session:
            await self._check_name(SnapshotRepository(session), name)

    async def reserve(self, user: User, name: str | None, shape_of: Snapshot, published_from: str) -> Snapshot:
        """The system snapshot's row, ``creating`` in the shape of ``shape_of``, so
        that garbage collection leaves its directory alone while it is filled."""
        async with self._db.transaction() as session:
            await self._check_name(SnapshotRepository(session), name)
            checked = (Shape(shape_of.memory_mb, shape_of.vcpu_count), SnapshotType.SYSTEM)
            snapshot = await add_creating(session, self._settings, None, name, checked, shape_of.image_variant)
            event = snapshot_event(snapshot, "snapshot.created", **by_user(user.id))
            payload = {**event.payload, "published_from": published_from}
            await record_event(session, replace(event, owner_id=user.id, payload=payload))
        return snapshot

    async def fill(
        self,
        snapshot_id: str,
        source: Snapshot,
        before_done: Callable[[], Awaitable[None]] | None = None,
        **columns: object,
    ) -> None:
        """Copy ``source``'s save into the reserved row's directory; the row ends
        ``ready`` (with ``columns``) or ``failed`` with the reason. ``before_done``
        runs once the copy ended, before the row says so (so that whoever polls
        the row finds the source's cleanup done)."""
        directory = Path((await reload(self._db, snapshot_id)).directory)
        outcome: dict[str, object]
        try:
            await self._node.copy_saved(Path(source.directory), directory)
        except Exception as error:  # a copy in the background has nobody else to record it
            log.warning("publishing %s as system snapshot %s failed: %s", source.id, snapshot_id, error)
            outcome = {"status": SnapshotStatus.FAILED, "failure_reason": str(error)}
        else:
            size = await asyncio.to_thread(directory_size, directory)
            outcome = {"status": SnapshotStatus.READY, "size_bytes": size, **columns}
        if before_done is not None:
            await before_done()
        await record(self._db, snapshot_id, None, **outcome)

    @staticmethod
    async def _check_name(repository: SnapshotRepository, name: str | None) -> None:
        if name is None:
            return
        systems = await repository.list_any_owner([SnapshotType.SYSTEM])
        taken = [s.id for s in systems if s.name == name and s.status != SnapshotStatus.FAILED]
        if taken:
            raise Conflict(f"a system snapshot named {name!r} exists already: {taken[0]}")

    async def unpublish(self, user: User, snapshot_id: str) -> None:
        """Remove a system snapshot (409 while a VM or snapshot builds on it)."""
        if not is_admin(user):
            raise Forbidden(OPERATOR_ONLY)
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).get_any_owner(snapshot_id)
        if snapshot is None or snapshot.type != SnapshotType.SYSTEM:
            raise NotFound(f"system snapshot {snapshot_id} not found")
        await self._snapshots.remove(snapshot, user.id)

    async def _source(self, user: User, request: SystemSnapshotRequest) -> tuple[Snapshot, str]:
        """The save to copy and the new snapshot's name, or a 422 saying what is wrong."""
        problems = []
        if (request.snapshot_id is None) == (request.image_variant is None):
            problems.append(FieldProblem(("snapshot_id",), "give exactly one of snapshot_id and image_variant"))
        if request.snapshot_id is not None:
            problems += [
                FieldProblem((field,), "only with image_variant: a snapshot keeps the shape it was saved with")
                for field, value in (("memory_mb", request.memory_mb), ("vcpu_count", request.vcpu_count))
                if value is not None
            ]
        name = request.name
        if name is not None and (not 1 <= len(name) <= MAX_SNAPSHOT_NAME_LENGTH or not name.isprintable()):
            problems.append(FieldProblem(("name",), f"must be 1-{MAX_SNAPSHOT_NAME_LENGTH} printable characters"))
        if problems:
            raise InvalidRequest(problems)
        if request.snapshot_id is not None:
            source = await self._own_snapshot(user, request.snapshot_id)
        else:
            assert request.image_variant is not None
            source = await self._base_snapshot(request)
        await asyncio.to_thread(self._disk.check_save, await asyncio.to_thread(directory_size, Path(source.directory)))
        return source, name or source.name or source.id

    async def _own_snapshot(self, user: User, snapshot_id: str) -> Snapshot:
        async with self._db.transaction() as session:
            source = await SnapshotRepository(session).get(user.id, snapshot_id)
        if source is None or source.type not in LISTED_TYPES:
            raise NotFound(f"snapshot_id: snapshot {snapshot_id} not found")
        if source.status != SnapshotStatus.READY:
            raise Conflict(f"snapshot_id: snapshot {snapshot_id} is {source.status}, not ready")
        if source.mounts:
            # Its VMs would mount the admin's volumes again.
            raise Conflict(f"snapshot_id: snapshot {snapshot_id} was saved with volumes mounted; it cannot be public")
        return source

    async def _base_snapshot(self, request: SystemSnapshotRequest) -> Snapshot:
        settings = self._settings
        variant = str(request.image_variant)
        known = self._images.variants()
        if variant not in known:
            raise InvalidRequest.single(
                ("image_variant",), f"unknown image variant {variant!r} (known: {', '.join(known)})"
            )
        image = self._images.get(variant)
        if image is None:
            raise ImageNotBuilt(f"image {variant!r} is not built; run kiln images build {variant}")
        memory_mb = request.memory_mb or settings.default_memory_mb
        shape = Shape(memory_mb, request.vcpu_count or settings.default_vcpu_count)
        problems = [
            FieldProblem((field,), f"must be between {low} and {high}")
            for field, value, low, high in (
                ("memory_mb", shape.memory_mb, settings.min_memory_mb, settings.vm_max_memory_mb),
                ("vcpu_count", shape.vcpu_count, 1, settings.vm_max_vcpus),
            )
            if not low <= value <= high
        ]
        if problems:
            raise InvalidRequest(problems)
        try:
            base_id, _ = await self._planner.ensure_base_snapshot(image, shape)
        except RuntimeFailure as error:
            raise VmStartFailed(f"{variant} {shape} (its base snapshot's boot)", str(error)) from error
        return await reload(self._db, base_id)
