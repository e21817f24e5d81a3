"""What a new VM starts from: a user's snapshot, else its image's base snapshot.

Fastest first: restore a saved VM (the snapshot asked for, else the base
snapshot of the image and shape, made once per image build and cached); a cold
boot only when there is none yet, while one is made in the background for the
next create.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from kiln.node.node import Node
from kiln.runtime.driver import BootImage, SavedState
from kiln.runtime.snapshots import BaseSnapshots, Shape, directory_size
from kiln.schemas.vms import VMCreateRequest
from kiln.services.background import BackgroundTasks
from kiln.services.errors import Conflict, FieldProblem, InvalidRequest, NotFound
from kiln.services.snapshots.rows import base_snapshot_id, now
from kiln.services.states import LISTED_TYPES, SnapshotStatus, SnapshotType
from kiln.services.vm_policy import CreatePlan
from kiln.store.db import Database
from kiln.store.models import Snapshot
from kiln.store.repositories import SnapshotRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestorePlan:
    """How a new VM starts from a saved state instead of booting."""

    saved: SavedState
    disk_snapshot_id: str  # the snapshot its overlay is written on
    snapshot_id: str | None  # the user's snapshot it was asked to start from, if any


class RestorePlanner:
    def __init__(
        self, db: Database, node: Node, base: BaseSnapshots, background: BackgroundTasks, max_shapes: int
    ) -> None:
        self._max_shapes = max_shapes
        self._db = db
        self._node = node
        self.base = base
        self._background = background

    async def plan_source(
        self, owner_id: int, request: VMCreateRequest, plan: CreatePlan
    ) -> tuple[CreatePlan, Snapshot | None]:
        """Apply ``snapshot_id`` of a create request: the VM takes the snapshot's
        shape and image (memory and vCPUs default to the snapshot's; asking for
        others is a 422, since a saved VM only continues on the machine it ran on)."""
        if request.snapshot_id is None:
            return plan, None
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).get(owner_id, request.snapshot_id)
        if snapshot is None or snapshot.type not in LISTED_TYPES:
            raise NotFound(f"snapshot_id: snapshot {request.snapshot_id} not found")
        if snapshot.status != SnapshotStatus.READY:
            raise Conflict(f"snapshot_id: snapshot {snapshot.id} is {snapshot.status}, not ready")
        problems = [
            FieldProblem(
                (field,),
                f"must be {wanted} (or left out): snapshot {snapshot.id} was saved with "
                f"{wanted} and a saved VM continues only with the {what} it had",
            )
            for field, asked, wanted, what in (
                ("memory_mb", request.memory_mb, snapshot.memory_mb, "memory"),
                ("vcpu_count", request.vcpu_count, snapshot.vcpu_count, "vCPUs"),
            )
            if asked is not None and asked != wanted
        ]
        if request.image_variant is not None and request.image_variant != snapshot.image_variant:
            problems.append(
                FieldProblem(
                    ("image_variant",),
                    f"must be {snapshot.image_variant!r} (or left out): the image of snapshot "
                    f"{snapshot.id}",
                )
            )
        if problems:
            raise InvalidRequest(problems)
        plan = dataclasses.replace(
            plan,
            memory_mb=snapshot.memory_mb,
            vcpu_count=snapshot.vcpu_count,
            image_variant=snapshot.image_variant,
        )
        return plan, snapshot

    async def plan_restore(
        self, plan: CreatePlan, image: BootImage, source: Snapshot | None
    ) -> RestorePlan | None:
        """The saved state a new VM continues from: its source snapshot, else the
        base snapshot of its image and shape. None: it must boot cold (no base
        snapshot of that shape yet; one is made in the background for next time)."""
        if source is not None:
            return RestorePlan(
                saved=self._node.saved_state(Path(source.directory)),
                disk_snapshot_id=source.id,
                snapshot_id=source.id,
            )
        shape = Shape(plan.memory_mb, plan.vcpu_count)
        base = await self.base_snapshot(image, shape)
        if base is None:
            later = self.make_base_snapshot_later(image, shape)
            log.warning(
                "no base snapshot of image %s for %s: this VM boots cold (slow)%s",
                image.variant,
                shape,
                "; one is being made for the next" if later else "",
            )
            return None
        snapshot_id, saved = base
        return RestorePlan(saved=saved, disk_snapshot_id=snapshot_id, snapshot_id=None)

    async def base_snapshot(self, image: BootImage, shape: Shape) -> tuple[str, SavedState] | None:
        """The cached base snapshot (its row made on first use), or None."""
        if self._node.accel not in ("kvm", "tcg"):
            await self._node.decide_accel(image)  # part of the cache key
        saved = self.base.find(image, shape)
        key = self.base.key(image, shape)
        if saved is None or key is None:
            return None
        snapshot_id = base_snapshot_id(key)
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            if await repository.get_any_owner(snapshot_id) is None:
                await repository.add(
                    Snapshot(
                        id=snapshot_id,
                        owner_id=None,
                        name=f"{image.variant} {shape}",
                        type=SnapshotType.BASE,
                        status=SnapshotStatus.READY,
                        vcpu_count=shape.vcpu_count,
                        memory_mb=shape.memory_mb,
                        image_variant=image.variant,
                        size_bytes=await asyncio.to_thread(directory_size, saved.directory),
                        directory=str(saved.directory),
                        created_at=now(),
                    )
                )
        return snapshot_id, saved

    async def ensure_base_snapshot(self, image: BootImage, shape: Shape) -> tuple[str, SavedState]:
        """The base snapshot, made now (a cold boot) if it is not cached."""
        await self.base.ensure(image, shape)
        found = await self.base_snapshot(image, shape)
        assert found is not None, "ensure made it"
        return found

    def make_base_snapshot_later(self, image: BootImage, shape: Shape) -> bool:
        """Start making the base snapshot in the background; False if it cannot be
        made (the image's files are missing)."""
        accel_decided = self._node.accel in ("kvm", "tcg")
        if accel_decided and self.base.key(image, shape) is None:
            return False
        if self.base.shapes_cached(image) >= self._max_shapes:
            # Users choose shapes; each new one costs a cold boot and a cache entry.
            log.warning("image %s has base snapshots of %d shapes already: none is made for %s",
                        image.variant, self._max_shapes, shape)  # fmt: skip
            return False
        self._background.run(self._make_base_quietly(image, shape), "base snapshot")
        return True

    async def _make_base_quietly(self, image: BootImage, shape: Shape) -> None:
        try:
            await self.ensure_base_snapshot(image, shape)
        except Exception as error:
            log.warning("making the base snapshot of %s for %s: %s", image.variant, shape, error)
