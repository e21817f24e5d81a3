"""Snapshots: saving VMs, restoring VMs from them, and their housekeeping.

A snapshot is a row (``kiln.store.models.Snapshot``) plus a directory the
runtime saved a VM into. Types:

- ``user``: ``POST /v1/vms/{id}/snapshot`` (and clones); the VM keeps running.
- ``auto``: taken when a VM with ``snapshot_on_terminate`` is terminated.
- ``base``: an image booted once and saved (``kiln.runtime.snapshots``); no
  owner, visible to every user, deletable by none through the API. New VMs are
  restored from these instead of booting.
- ``suspend``: a suspended VM's saved state. Never listed; removed with its VM.

``POST /v1/snapshots`` imports an OCI image (``import_image``): the layout (or
a pulled registry image) is unpacked (``kiln.runtime.oci``), given the guest
agent and init (``kiln.runtime.images.install_guest``), made an ext4 image,
cold-booted with the ``default`` variant's kernel and initramfs, given the
image's Env, and saved. Its rootfs lives in the snapshot's directory
(``rootfs.ext4``), under its saved disk; its ``image_variant`` is ``default``.

Disks form chains: a saved disk is written on top of its parent snapshot's disk
(``parent_id``), and a VM's own overlay on top of ``Vm.disk_snapshot_id``. So a
snapshot can be deleted only when no snapshot has it as parent and no VM that
still has a disk writes on top of it (409 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.config import Settings
from kiln.runtime import oci
from kiln.runtime.driver import BootImage, Hypervisor, MachineSpec, SavedState, SaveError
from kiln.runtime.images import (
    UnsuitableRootfs,
    find_guest_python,
    install_guest,
    make_ext4,
)
from kiln.runtime.pool import WarmPool
from kiln.runtime.snapshots import BaseSnapshots, Shape, directory_size, remove_saved
from kiln.schemas.snapshots import SnapshotImportRequest
from kiln.schemas.vms import VMCreateRequest
from kiln.services import oci_sources
from kiln.services.errors import (
    Conflict,
    FieldProblem,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from kiln.services.vm_policy import (
    DEFAULT_IMAGE_VARIANT,
    ENV_NAME_PATTERN,
    MAX_SNAPSHOT_NAME_LENGTH,
    CreatePlan,
)
from kiln.store.db import Database
from kiln.store.models import Snapshot, Vm
from kiln.store.repositories import SnapshotRepository, VmRepository

if TYPE_CHECKING:
    from kiln.services.vms import ImageSource, VmService

log = logging.getLogger(__name__)


class SnapshotType(StrEnum):
    USER = "user"
    AUTO = "auto"
    BASE = "base"
    SUSPEND = "suspend"


class SnapshotStatus(StrEnum):
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"


# What GET /v1/snapshots shows and ?type= accepts.
LISTED_TYPES = (SnapshotType.USER, SnapshotType.BASE, SnapshotType.AUTO)
# VM states in which a VM still has a disk (on top of its disk_snapshot_id).
VM_STATES_WITH_A_DISK = ("creating", "running", "suspending", "suspended", "resuming", "terminating")
VM_ENDED_STATES = ("terminated", "failed")
GC_INTERVAL_SECONDS = 60.0
# OCI imports: where they are assembled ($KILN_DATA_DIR/imports/<snapshot id>/,
# removed when done; leftovers of a stopped server go at the next start), the
# name of the rootfs inside the snapshot's directory, and their defaults.
IMPORTS_DIR_NAME = "imports"
IMPORTED_ROOTFS_NAME = "rootfs.ext4"
IMPORT_TYPES = (SnapshotType.USER, SnapshotType.AUTO)
IMPORT_FREE_SPACE_MB = 512
IMPORT_MAX_FREE_SPACE_MB = 64 * 1024
IMPORT_BUILD_ARGS = ("env", "workdir", "free_space_mb")
REGISTRY_CONNECT_TIMEOUT_SECONDS = 10.0
REGISTRY_PULL_TIMEOUT_SECONDS = 900.0


@dataclass(frozen=True)
class ImportPlan:
    """A checked ``POST /v1/snapshots`` body."""

    source: oci.OciImage | oci.Reference
    env: dict[str, str]
    workdir: str | None
    free_space_mb: int


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(8)


def base_snapshot_id(key: str) -> str:
    return "base-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RestorePlan:
    """How a new VM starts from a saved state instead of booting."""

    saved: SavedState
    disk_snapshot_id: str  # the snapshot its overlay is written on
    snapshot_id: str | None  # the user's snapshot it was asked to start from, if any


class SnapshotService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        hypervisor: Hypervisor,
        vms: VmService,
        images: ImageSource | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._hypervisor = hypervisor
        self._vms = vms
        self.base = BaseSnapshots(settings, hypervisor)
        self._images = images
        self._background: set[asyncio.Task[None]] = set()
        self._gc_loop: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Settle snapshots a stopped server left half-made, then collect garbage."""
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            for snapshot in await repository.list_any_owner():
                if snapshot.status == SnapshotStatus.CREATING:
                    await repository.update_any_owner(
                        snapshot.id,
                        status=SnapshotStatus.FAILED,
                        failure_reason="the server stopped while the snapshot was being made",
                    )
        await self.collect_garbage()
        await self.base.remove_unfinished_builds()
        await self._remove_unfinished_imports()
        self._gc_loop = asyncio.create_task(self._collect_garbage_forever(), name="snapshot-gc")

    async def stop(self) -> None:
        tasks = [*self._background, *([self._gc_loop] if self._gc_loop else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._background.clear()
        self._gc_loop = None

    # -- user operations -------------------------------------------------------------

    async def snapshot_vm(
        self, owner_id: int, vm_id: str, name: str | None, wait: bool
    ) -> Snapshot:
        """Save a running VM, which keeps running (POST /v1/vms/{id}/snapshot)."""
        vm = await self._vms.get(owner_id, vm_id)
        if vm.status != "running":
            raise Conflict(f"vm {vm_id} is {vm.status}; only a running VM can be snapshotted")
        snapshot = await self._add(vm, SnapshotType.USER, name)
        task = self._in_background(self._save(vm.id, snapshot.id, keep_running=True))
        if wait:
            # Shielded: a client that hangs up must not cut a save short. A failure
            # is recorded on the snapshot (status failed, failure_reason).
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        return await self._reload(snapshot.id)

    async def clone_vm(
        self, owner_id: int, vm_id: str, request: VMCreateRequest, wait: bool
    ) -> Vm:
        """Snapshot the VM (named ``request.snapshot_name``) and create a new VM
        from that snapshot with the other create fields of ``request``."""
        if request.snapshot_id is not None:
            raise InvalidRequest.single(
                ("snapshot_id",), "a clone starts from the VM itself; leave snapshot_id out"
            )
        snapshot = await self.snapshot_vm(owner_id, vm_id, request.snapshot_name, wait=True)
        if snapshot.status != SnapshotStatus.READY:
            raise Conflict(f"vm {vm_id} could not be snapshotted: {snapshot.failure_reason}")
        create = request.model_copy(update={"snapshot_id": snapshot.id, "snapshot_name": None})
        return await self._vms.create(owner_id, create, wait)

    async def import_image(
        self, owner_id: int, request: SnapshotImportRequest, wait: bool
    ) -> Snapshot:
        """A snapshot of an OCI image booted once (POST /v1/snapshots).

        The body is checked first (422: a path that is no OCI layout, a bad
        shape, type or build_args). The import then runs in the background;
        waited for, a problem of the image itself (no python3, a digest that
        does not match, an unreachable registry) is a 422 and leaves no record,
        any other failure comes back as the record, ``failed`` with its reason."""
        default = self._images.get(DEFAULT_IMAGE_VARIANT) if self._images is not None else None
        if self._images is None or not hasattr(self._images, "guest_busybox"):
            raise Unsupported("this server cannot build images, so it cannot import OCI images")
        if default is None:
            raise ImageNotBuilt(
                f"image {DEFAULT_IMAGE_VARIANT!r} (whose kernel boots imported images) is not built; "
                f"run kiln images build {DEFAULT_IMAGE_VARIANT}"
            )
        plan, shape, snapshot_type = await self._check_import(request)
        snapshot_id = new_snapshot_id()
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).add(
                Snapshot(
                    id=snapshot_id,
                    owner_id=owner_id,
                    name=request.name,
                    type=snapshot_type,
                    status=SnapshotStatus.CREATING,
                    vcpu_count=shape.vcpu_count,
                    memory_mb=shape.memory_mb,
                    image_variant=DEFAULT_IMAGE_VARIANT,
                    size_bytes=0,
                    directory=str((self._settings.snapshots_dir / snapshot_id).resolve()),
                    created_at=_now(),
                )
            )
        task = self._in_background(self._import(snapshot.id, plan, shape, default))
        if not wait:
            return snapshot
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
        error = task.exception() if task.done() and not task.cancelled() else None
        if isinstance(error, oci.OciError | UnsuitableRootfs):
            async with self._db.transaction() as session:
                await SnapshotRepository(session).delete(await self._reload(snapshot.id))
            raise InvalidRequest.single(("oci_image",), str(error))
        return await self._reload(snapshot.id)

    async def list(self, owner_id: int, snapshot_type: str | None) -> list[Snapshot]:
        if snapshot_type is not None and snapshot_type not in LISTED_TYPES:
            raise InvalidRequest.single(
                ("type",), f"must be one of {', '.join(LISTED_TYPES)}"
            )
        types = [snapshot_type] if snapshot_type else list(LISTED_TYPES)
        async with self._db.transaction() as session:
            return await SnapshotRepository(session).list(owner_id, types)

    async def get(self, owner_id: int, snapshot_id: str) -> Snapshot:
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).get(owner_id, snapshot_id)
        if snapshot is None or snapshot.type not in LISTED_TYPES:
            raise NotFound(f"snapshot {snapshot_id} not found")
        return snapshot

    async def delete(self, owner_id: int, snapshot_id: str) -> None:
        snapshot = await self.get(owner_id, snapshot_id)
        if snapshot.type == SnapshotType.BASE:
            raise Conflict(
                f"snapshot {snapshot_id} is a base snapshot: it belongs to its image, "
                "and VMs are made from it; it cannot be deleted through the API"
            )
        if snapshot.status == SnapshotStatus.CREATING:
            raise Conflict(f"snapshot {snapshot_id} is still being made")
        # Suspended states of ended VMs may be all that still hangs off it.
        await self.collect_garbage()
        async with self._db.transaction() as session:
            users = await self._dependents(SnapshotRepository(session), snapshot_id)
            if users:
                raise Conflict(f"snapshot {snapshot_id} is in use by {', '.join(users)}")
            await SnapshotRepository(session).delete(snapshot)
        await asyncio.to_thread(remove_saved, Path(snapshot.directory))

    # -- for the VM service ----------------------------------------------------------

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
                saved=self._hypervisor.saved_state(Path(source.directory)),
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
        if self._hypervisor.accel not in ("kvm", "tcg"):
            await self._hypervisor.decide_accel(image)  # part of the cache key
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
                        created_at=_now(),
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
        accel_decided = self._hypervisor.accel in ("kvm", "tcg")
        if accel_decided and self.base.key(image, shape) is None:
            return False
        self._in_background(self._make_base_quietly(image, shape))
        return True

    async def save_before_teardown(self, vm: Vm, snapshot_type: SnapshotType, name: str | None) -> Snapshot:
        """Save a VM that is about to stop (terminate with snapshot_on_terminate,
        suspend): its process stops and its disk moves into the snapshot."""
        snapshot = await self._add(vm, snapshot_type, name)
        await self._save(vm.id, snapshot.id, keep_running=False)
        return await self._reload(snapshot.id)

    async def adopt_suspend_state(self, snapshot_id: str, name: str | None) -> Snapshot:
        """A suspended VM being terminated with snapshot_on_terminate: its saved
        state already is the snapshot wanted; it becomes the user's (type auto)."""
        async with self._db.transaction() as session:
            await SnapshotRepository(session).update_any_owner(
                snapshot_id, type=SnapshotType.AUTO, name=name
            )
        return await self._reload(snapshot_id)

    async def saved_state_of(self, snapshot_id: str) -> SavedState:
        snapshot = await self._reload(snapshot_id)
        return self._hypervisor.saved_state(Path(snapshot.directory))

    async def start_pool(
        self, images: ImageSource, new_vm_id: Callable[[], str]
    ) -> WarmPool | None:
        """The warm pool (KILN_POOL_SIZE idle VMs of the default image and shape),
        started; None when the size is 0. It also clears idle VMs a crashed
        server left, whatever the size now."""
        settings = self._settings
        shape = Shape(settings.default_memory_mb, settings.default_vcpu_count)

        async def default_base() -> tuple[BootImage, SavedState] | None:
            image = images.get(DEFAULT_IMAGE_VARIANT)
            if image is None:
                return None
            _, saved = await self.ensure_base_snapshot(image, shape)
            return image, saved

        pool = WarmPool(settings, self._hypervisor, settings.pool_size, default_base, new_vm_id)
        await pool.start()
        return pool if settings.pool_size > 0 else None

    # -- housekeeping ----------------------------------------------------------------

    async def collect_garbage(self) -> None:
        """Remove what nothing needs any more: saved states of suspended VMs that
        ended (unless a snapshot was taken on top of them), and directories under
        the snapshots dir that no row names (a crash between the two)."""
        while await self._remove_one_unneeded_suspend_state():
            pass
        snapshots_dir = self._settings.snapshots_dir
        if not snapshots_dir.is_dir():
            return
        async with self._db.transaction() as session:
            known = {Path(s.directory).name for s in await SnapshotRepository(session).list_any_owner()}
        for directory in snapshots_dir.iterdir():
            if directory.name not in known:
                log.info("removing %s: no snapshot record names it", directory)
                await asyncio.to_thread(remove_saved, directory)

    async def _remove_one_unneeded_suspend_state(self) -> bool:
        async with self._db.transaction() as session:
            snapshots = SnapshotRepository(session)
            vms = VmRepository(session)
            for snapshot in await snapshots.list_any_owner([SnapshotType.SUSPEND]):
                vm = await vms.get_any_owner(snapshot.source_vm_id or "")
                if vm is not None and vm.status not in VM_ENDED_STATES:
                    continue
                if await self._dependents(snapshots, snapshot.id):
                    continue
                await snapshots.delete(snapshot)
                directory = Path(snapshot.directory)
                break
            else:
                return False
        await asyncio.to_thread(remove_saved, directory)
        return True

    # -- internals -------------------------------------------------------------------

    async def _add(self, vm: Vm, snapshot_type: SnapshotType, name: str | None) -> Snapshot:
        snapshot_id = new_snapshot_id()
        async with self._db.transaction() as session:
            return await SnapshotRepository(session).add(
                Snapshot(
                    id=snapshot_id,
                    owner_id=vm.owner_id,
                    name=name,
                    type=snapshot_type,
                    status=SnapshotStatus.CREATING,
                    vcpu_count=vm.vcpu_count,
                    memory_mb=vm.memory_mb,
                    image_variant=vm.image_variant,
                    size_bytes=0,
                    source_vm_id=vm.id,
                    parent_id=vm.disk_snapshot_id,
                    directory=str((self._settings.snapshots_dir / snapshot_id).resolve()),
                    created_at=_now(),
                )
            )

    async def _save(self, vm_id: str, snapshot_id: str, *, keep_running: bool) -> None:
        """Save the VM into the snapshot's directory and record the outcome.

        Either way the VM's disk may now be written on top of the snapshot's
        disk (the save froze it); then the VM depends on the snapshot."""
        snapshot = await self._reload(snapshot_id)
        try:
            saved, disk_parent = await self._vms.save_machine(
                vm_id, Path(snapshot.directory), keep_running=keep_running
            )
        except Exception as error:
            disk_in_use = isinstance(error, SaveError) and error.disk_in_use
            log.warning("snapshot %s of vm %s failed: %s", snapshot_id, vm_id, error)
            await self._record(
                snapshot_id,
                vm_id if disk_in_use else None,
                status=SnapshotStatus.FAILED,
                failure_reason=str(error) or type(error).__name__,
            )
            raise
        size = await asyncio.to_thread(directory_size, saved.directory)
        await self._record(
            snapshot_id, vm_id, status=SnapshotStatus.READY, size_bytes=size, parent_id=disk_parent
        )
        if await self._chain_depth(snapshot_id) > self._settings.max_disk_chain:
            self._in_background(self._flatten(snapshot_id))

    async def _chain_depth(self, snapshot_id: str) -> int:
        """Snapshot disks under (and including) this one's, down to the image."""
        depth, current = 0, snapshot_id
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            while current is not None and depth <= self._settings.max_disk_chain + 1:
                snapshot = await repository.get_any_owner(current)
                if snapshot is None:
                    break
                depth, current = depth + 1, snapshot.parent_id
        return depth

    async def _flatten(self, snapshot_id: str) -> None:
        """Make the snapshot's disk stand on the image alone, so that reads do not
        walk a long chain and its parents become deletable."""
        snapshot = await self._reload(snapshot_id)
        try:
            await self._hypervisor.flatten_saved_disk(Path(snapshot.directory))
        except Exception as error:
            log.warning("flattening snapshot %s failed: %s", snapshot_id, error)
            return
        size = await asyncio.to_thread(directory_size, Path(snapshot.directory))
        # An imported image's rootfs lives in its snapshot: the flat disk still
        # stands on it, so that snapshot stays its parent.
        await self._record(snapshot_id, None, parent_id=await self._imported_root(snapshot_id), size_bytes=size)

    async def _imported_root(self, snapshot_id: str) -> str | None:
        """The bottom of the snapshot's disk chain if that is an imported image."""
        bottom, current = None, snapshot_id
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            for _ in range(self._settings.max_disk_chain + 2):
                row = await repository.get_any_owner(current)
                if row is None:
                    break
                bottom = row
                if row.parent_id is None:
                    break
                current = row.parent_id
        if bottom is None or bottom.id == snapshot_id:
            return None
        return bottom.id if (Path(bottom.directory) / IMPORTED_ROOTFS_NAME).exists() else None

    async def _record(self, snapshot_id: str, vm_on_it: str | None, **fields: object) -> None:
        async with self._db.transaction() as session:
            await SnapshotRepository(session).update_any_owner(snapshot_id, **fields)
            if vm_on_it is not None:
                await VmRepository(session).set_disk_snapshot_any_owner(vm_on_it, snapshot_id)

    async def _dependents(self, snapshots: SnapshotRepository, snapshot_id: str) -> list[str]:
        children = await snapshots.children_any_owner(snapshot_id)
        vms = await snapshots.vms_on_disk_any_owner(snapshot_id, VM_STATES_WITH_A_DISK)
        return [f"vm {vm_id}" for vm_id in vms] + [f"snapshot {child}" for child in children]

    async def _reload(self, snapshot_id: str) -> Snapshot:
        async with self._db.transaction() as session:
            snapshot = await SnapshotRepository(session).get_any_owner(snapshot_id)
        if snapshot is None:
            raise NotFound(f"snapshot {snapshot_id} not found")
        return snapshot

    async def _check_import(
        self, request: SnapshotImportRequest
    ) -> tuple[ImportPlan, Shape, SnapshotType]:
        settings = self._settings
        problems: list[FieldProblem] = []

        def within(field: str, value: int | None, default: int, low: int, high: int) -> int:
            if value is None:
                return default
            if not low <= value <= high:
                problems.append(FieldProblem((field,), f"must be between {low} and {high}"))
            return value

        memory_mb = within(
            "memory_mb", request.memory_mb, settings.default_memory_mb,
            settings.min_memory_mb, settings.vm_max_memory_mb,
        )  # fmt: skip
        vcpu_count = within("vcpu_count", request.vcpu_count, settings.default_vcpu_count, 1, settings.vm_max_vcpus)
        snapshot_type = SnapshotType.USER
        if request.type is not None:
            if request.type not in IMPORT_TYPES:
                problems.append(FieldProblem(("type",), f"must be one of {', '.join(IMPORT_TYPES)}"))
            else:
                snapshot_type = SnapshotType(request.type)
        name = request.name
        if name is not None and (not 1 <= len(name) <= MAX_SNAPSHOT_NAME_LENGTH or not name.isprintable()):
            problems.append(FieldProblem(("name",), f"must be 1-{MAX_SNAPSHOT_NAME_LENGTH} printable characters"))
        args = request.build_args or {}
        for key in args:
            if key not in IMPORT_BUILD_ARGS:
                problems.append(
                    FieldProblem(("build_args", key), f"unknown; build_args takes {', '.join(IMPORT_BUILD_ARGS)}")
                )
        env = args.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and ENV_NAME_PATTERN.fullmatch(k) and isinstance(v, str) and "\0" not in v
            for k, v in env.items()
        ):
            problems.append(FieldProblem(("build_args", "env"), "must map variable names to strings"))
        workdir = args.get("workdir")
        if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
            problems.append(FieldProblem(("build_args", "workdir"), "must be an absolute path"))
        free_space_mb = args.get("free_space_mb", IMPORT_FREE_SPACE_MB)
        if (
            not isinstance(free_space_mb, int) or isinstance(free_space_mb, bool)
            or not 0 <= free_space_mb <= IMPORT_MAX_FREE_SPACE_MB
        ):  # fmt: skip
            problems.append(
                FieldProblem(("build_args", "free_space_mb"), f"must be between 0 and {IMPORT_MAX_FREE_SPACE_MB}")
            )
        source: oci.OciImage | oci.Reference | None = None
        try:
            source = await self._import_source(request.oci_image)
        except oci.OciError as error:
            problems.append(FieldProblem(("oci_image",), str(error)))
        if problems:
            raise InvalidRequest(problems)
        assert source is not None
        plan = ImportPlan(source, dict(env), workdir, free_space_mb)
        return plan, Shape(memory_mb, vcpu_count), snapshot_type

    async def _import_source(self, text: str) -> oci.OciImage | oci.Reference:
        """A local OCI layout (read and checked now), or a registry reference;
        only from where the operator allows (kiln.services.oci_sources)."""
        return await oci_sources.import_source(self._settings, text)

    async def _import(self, snapshot_id: str, plan: ImportPlan, shape: Shape, default: BootImage) -> None:
        """Assemble, boot and save an imported image into the snapshot's directory;
        the record ends ``ready`` or ``failed`` with the reason. Nothing is left
        behind on failure: no VM, no work dir, no half-saved directory."""
        snapshot = await self._reload(snapshot_id)
        saved_dir = Path(snapshot.directory)
        work = self._settings.data_dir / IMPORTS_DIR_NAME / snapshot_id
        vm_id = import_vm_id(snapshot_id)
        run_dir = work / "vm"
        timings: dict[str, float] = {}
        started = time.monotonic()
        try:
            work.mkdir(parents=True)
            work.chmod(0o755)  # QEMU may run as another user
            image = plan.source
            if isinstance(image, oci.Reference):
                layout = oci.private_dir(work) / "layout"
                await oci.pull(image, layout, REGISTRY_PULL_TIMEOUT_SECONDS, REGISTRY_CONNECT_TIMEOUT_SECONDS)
                image = await asyncio.to_thread(oci.open_layout, layout)
                timings["pull"] = time.monotonic() - started
            store = self._images
            busybox = await asyncio.to_thread(store.guest_busybox, DEFAULT_IMAGE_VARIANT)  # type: ignore[union-attr]
            limits = oci.UnpackLimits(self._settings.oci_max_unpacked_bytes, self._settings.oci_max_entries)
            rootfs = await asyncio.to_thread(
                assemble_rootfs, image, work, busybox, store.init_dir,  # type: ignore[union-attr]
                plan.workdir, plan.free_space_mb, timings, limits,
            )  # fmt: skip
            boot_image = dataclasses.replace(default, rootfs=rootfs)
            mark = time.monotonic()
            machine = await self._hypervisor.start(
                MachineSpec(
                    vm_id=vm_id,
                    vcpu_count=shape.vcpu_count,
                    memory_mb=shape.memory_mb,
                    image=boot_image,
                    run_dir=run_dir,
                    memory_in_file=True,
                )
            )
            await machine.wait_ready(self._settings.boot_timeout_seconds)
            env = {**image.config.env, **plan.env}
            if env:
                # Kept by the agent (and in /etc/environment): every VM restored
                # from the snapshot runs its commands with the image's Env.
                await machine.agent.call("set_env", env=env, timeout=30)
            timings["boot"] = time.monotonic() - mark
            mark = time.monotonic()
            await self._hypervisor.save(machine, saved_dir, keep_running=False)
            kept = saved_dir / IMPORTED_ROOTFS_NAME
            await asyncio.to_thread(os.replace, rootfs, kept)
            kept.chmod(0o444)
            await self._hypervisor.rebase_saved_disk(saved_dir, kept)
            timings["save"] = time.monotonic() - mark
        except BaseException as error:
            await asyncio.to_thread(remove_saved, saved_dir)
            reason = str(error) or type(error).__name__
            if isinstance(error, asyncio.CancelledError):
                reason = "the server stopped while the image was being imported"
            log.warning("importing snapshot %s failed: %s", snapshot_id, reason)
            with contextlib.suppress(Exception):
                await self._record(snapshot_id, None, status=SnapshotStatus.FAILED, failure_reason=reason)
            raise
        finally:
            await self._hypervisor.destroy(vm_id, run_dir)
            await asyncio.to_thread(shutil.rmtree, work, True)
        size = await asyncio.to_thread(directory_size, saved_dir)
        await self._record(snapshot_id, None, status=SnapshotStatus.READY, size_bytes=size)
        log.info(
            "imported snapshot %s in %.1fs (%s)", snapshot_id, time.monotonic() - started,
            ", ".join(f"{step} {seconds:.1f}s" for step, seconds in timings.items()),
        )  # fmt: skip

    async def _remove_unfinished_imports(self) -> None:
        """Work dirs (and their VMs) of imports a stopped server left."""
        imports = self._settings.data_dir / IMPORTS_DIR_NAME
        if not imports.is_dir():
            return
        for work in imports.iterdir():
            log.info("removing the unfinished import %s", work.name)
            await self._hypervisor.destroy(import_vm_id(work.name), work / "vm")
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _make_base_quietly(self, image: BootImage, shape: Shape) -> None:
        try:
            await self.ensure_base_snapshot(image, shape)
        except Exception as error:
            log.warning("making the base snapshot of %s for %s failed: %s", image.variant, shape, error)

    def _in_background(self, work: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(work)  # type: ignore[arg-type]
        self._background.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            self._background.discard(done)
            if not done.cancelled() and done.exception() is not None:
                log.debug("background snapshot work failed: %s", done.exception())

        task.add_done_callback(finished)
        return task

    async def _collect_garbage_forever(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL_SECONDS)
            try:
                await self.collect_garbage()
            except Exception:
                log.exception("snapshot garbage collection failed")


def import_vm_id(snapshot_id: str) -> str:
    return "import-" + snapshot_id.removeprefix("snap-")


def assemble_rootfs(
    image: oci.OciImage,
    work: Path,
    busybox: Path,
    init_dir: Path,
    workdir: str | None,
    free_space_mb: int,
    timings: dict[str, float],
    limits: oci.UnpackLimits | None = None,
) -> Path:
    """The image's layers, plus the guest agent and init, as ``work/rootfs.ext4``
    (blocking: run it in a thread). UnsuitableRootfs without a usable python3.
    The tree is unpacked in a private (0700) directory, within ``limits``."""
    tree = oci.private_dir(work) / "tree"
    tree.mkdir()
    tree.chmod(0o755)
    started = time.monotonic()
    report = oci.unpack(image, tree, limits)
    if report.skipped_devices:
        log.info("import: skipped %d device nodes (%s ...)", len(report.skipped_devices), report.skipped_devices[0])
    if report.cleared_setid:
        log.info("import: cleared setuid/setgid bits of %d entries (%s ...)", len(report.cleared_setid), report.cleared_setid[0])
    timings["unpack"] = time.monotonic() - started
    python = find_guest_python(tree)
    install_guest(tree, busybox, init_dir, workdir=workdir or image.config.working_dir or "/", python=python)
    started = time.monotonic()
    rootfs = work / IMPORTED_ROOTFS_NAME
    make_ext4(tree, rootfs, free_space_mb)
    timings["mkfs"] = time.monotonic() - started
    shutil.rmtree(tree)
    return rootfs
