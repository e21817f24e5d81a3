"""Snapshots from OCI images (``POST /v1/snapshots`` with ``oci_image``).

The layout (or a pulled registry image) is unpacked (``kiln.runtime.oci``),
given the guest agent and init (``kiln.runtime.images.install_guest``), made an
ext4 image, cold-booted with the ``default`` variant's kernel and initramfs
(through the node's pipeline, as the node's own VM), given the image's Env, and
saved. Its rootfs lives in the snapshot's directory (``rootfs.ext4``), under
its saved disk; its ``image_variant`` is ``default``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from kiln.config import Settings
from kiln.node.launcher import PipelineLauncher
from kiln.node.node import Node
from kiln.runtime import oci
from kiln.runtime.driver import BootImage, MachineSpec
from kiln.runtime.images import UnsuitableRootfs, find_guest_python, install_guest, make_ext4
from kiln.runtime.snapshots import Shape, directory_size, remove_saved
from kiln.schemas.snapshots import SnapshotImportRequest
from kiln.services import oci_sources
from kiln.services.background import BackgroundTasks
from kiln.services.errors import FieldProblem, ImageNotBuilt, InvalidRequest, Unsupported
from kiln.services.events.record import record as record_event
from kiln.services.events.record import snapshot_event
from kiln.services.snapshots.requests import add_creating, check_basics
from kiln.services.snapshots.rows import (
    IMPORTED_ROOTFS_NAME,
    record,
    reload,
)
from kiln.services.states import SnapshotStatus, SnapshotType
from kiln.services.vm_policy import DEFAULT_IMAGE_VARIANT, ENV_NAME_PATTERN
from kiln.store.db import Database
from kiln.store.models import Snapshot
from kiln.store.repositories import SnapshotRepository

log = logging.getLogger(__name__)

# OCI imports: where they are assembled ($KILN_DATA_DIR/imports/<snapshot id>/,
# removed when done; leftovers of a stopped server go at the next start), the
# and their defaults.
IMPORTS_DIR_NAME = "imports"
IMPORT_FREE_SPACE_MB = 512
IMPORT_MAX_FREE_SPACE_MB = 64 * 1024
IMPORT_BUILD_ARGS = ("env", "workdir", "free_space_mb")
# A build's keys (extra_apt_packages, ...) are for image variants, not imports.
IMPORT_ARGS_ONLY = (
    f"an OCI import takes {', '.join(IMPORT_BUILD_ARGS)}; a build (extra_apt_packages, "
    "post_build_cmd, ...) runs on an image variant of this server: give its name "
    "(e.g. default) as oci_image"
)
REGISTRY_CONNECT_TIMEOUT_SECONDS = 10.0
REGISTRY_PULL_TIMEOUT_SECONDS = 900.0


@dataclass(frozen=True)
class ImportPlan:
    """A checked ``POST /v1/snapshots`` body."""

    source: oci.OciImage | oci.Reference
    env: dict[str, str]
    workdir: str | None
    free_space_mb: int


@runtime_checkable
class ImageFiles(Protocol):
    """The part of ``kiln.runtime.images.ImageStore`` an import needs."""

    init_dir: Path

    def get(self, variant: str) -> BootImage | None: ...

    def guest_busybox(self, variant: str) -> Path: ...


class ImageImporter:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        node: Node,
        images: ImageFiles | None,
        background: BackgroundTasks,
    ) -> None:
        self._settings = settings
        self._db = db
        self._node = node
        self._launcher = PipelineLauncher(node)
        self._images = images
        self._background = background

    async def import_image(
        self, owner_id: int, request: SnapshotImportRequest, wait: bool
    ) -> Snapshot:
        """A snapshot of an OCI image booted once (POST /v1/snapshots).

        The body is checked first (422: a path that is no OCI layout, a bad
        shape, type or build_args). The import then runs in the background;
        waited for, a problem of the image itself (no python3, a digest that
        does not match, an unreachable registry) is a 422 and leaves no record,
        any other failure comes back as the record, ``failed`` with its reason."""
        snapshot, task = await self.start(owner_id, request)
        if not wait:
            return snapshot
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
        error = task.exception() if task.done() and not task.cancelled() else None
        if isinstance(error, oci.OciError | UnsuitableRootfs):
            async with self._db.transaction() as session:
                await SnapshotRepository(session).delete(await reload(self._db, snapshot.id))
            raise InvalidRequest.single(("oci_image",), str(error))
        return await reload(self._db, snapshot.id)

    async def start(self, owner_id: int, request: SnapshotImportRequest) -> tuple[Snapshot, asyncio.Task[None]]:
        """The checked body's record, ``creating``, and the task that imports
        into it (what ``system_builds`` waits for)."""
        default = self._images.get(DEFAULT_IMAGE_VARIANT) if self._images is not None else None
        if self._images is None:
            raise Unsupported("this server cannot build images, so it cannot import OCI images")
        if default is None:
            raise ImageNotBuilt(
                f"image {DEFAULT_IMAGE_VARIANT!r} (whose kernel boots imported images) is not built; "
                f"run kiln images build {DEFAULT_IMAGE_VARIANT}"
            )
        plan, shape, snapshot_type = await self._check_import(request)
        async with self._db.transaction() as session:
            snapshot = await add_creating(
                session, self._settings, owner_id, request.name, (shape, snapshot_type), DEFAULT_IMAGE_VARIANT
            )
            payload = {"oci_image": request.oci_image}
            await record_event(session, replace(snapshot_event(snapshot, "snapshot.created"), payload=payload))
        return snapshot, self._background.run(self._import(snapshot.id, plan, shape, default), f"import {snapshot.id}")

    async def _check_import(
        self, request: SnapshotImportRequest
    ) -> tuple[ImportPlan, Shape, SnapshotType]:
        problems: list[FieldProblem] = []
        shape, snapshot_type = check_basics(request, self._settings, problems)
        args = request.build_args or {}
        for key in args:
            if key not in IMPORT_BUILD_ARGS:
                problems.append(FieldProblem(("build_args", key), f"unknown; {IMPORT_ARGS_ONLY}"))
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
        return plan, shape, snapshot_type

    async def _import_source(self, text: str) -> oci.OciImage | oci.Reference:
        """A local OCI layout (read and checked now), or a registry reference;
        only from where the operator allows (kiln.services.oci_sources)."""
        return await oci_sources.import_source(self._settings, text)

    async def _import(self, snapshot_id: str, plan: ImportPlan, shape: Shape, default: BootImage) -> None:
        """Assemble, boot and save an imported image into the snapshot's directory;
        the record ends ``ready`` or ``failed`` with the reason. Nothing is left
        behind on failure: no VM, no work dir, no half-saved directory."""
        snapshot = await reload(self._db, snapshot_id)
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
            assert store is not None, "import_image checked it"
            busybox = await asyncio.to_thread(store.guest_busybox, DEFAULT_IMAGE_VARIANT)
            limits = oci.UnpackLimits(self._settings.oci_max_unpacked_bytes, self._settings.oci_max_entries)
            rootfs = await asyncio.to_thread(
                assemble_rootfs, image, work, busybox, store.init_dir,
                plan.workdir, plan.free_space_mb, timings, limits,
            )  # fmt: skip
            boot_image = dataclasses.replace(default, rootfs=rootfs)
            mark = time.monotonic()
            machine = await self._launcher.start(
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
            await self._node.save(vm_id, saved_dir, keep_running=False)
            kept = saved_dir / IMPORTED_ROOTFS_NAME
            await asyncio.to_thread(os.replace, rootfs, kept)
            await self._node.rebase_saved_disk(saved_dir, kept)
            timings["save"] = time.monotonic() - mark
        except BaseException as error:
            await asyncio.to_thread(remove_saved, saved_dir)
            reason = str(error) or type(error).__name__
            if isinstance(error, asyncio.CancelledError):
                reason = "the server stopped while the image was being imported"
            log.warning("importing snapshot %s failed: %s", snapshot_id, reason)
            with contextlib.suppress(Exception):
                await record(self._db, snapshot_id, None, status=SnapshotStatus.FAILED, failure_reason=reason)
            raise
        finally:
            await self._launcher.stop(vm_id, run_dir)
            await asyncio.to_thread(shutil.rmtree, work, True)
        size = await asyncio.to_thread(directory_size, saved_dir)
        await record(self._db, snapshot_id, None, status=SnapshotStatus.READY, size_bytes=size)
        log.info(
            "imported snapshot %s in %.1fs (%s)", snapshot_id, time.monotonic() - started,
            ", ".join(f"{step} {seconds:.1f}s" for step, seconds in timings.items()),
        )  # fmt: skip

    async def remove_unfinished(self) -> None:
        """Work dirs (and their VMs) of imports a stopped server left."""
        imports = self._settings.data_dir / IMPORTS_DIR_NAME
        if not imports.is_dir():
            return
        for work in imports.iterdir():
            log.info("removing the unfinished import %s", work.name)
            await self._node.stop(import_vm_id(work.name))
            await asyncio.to_thread(shutil.rmtree, work, True)



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
        cleared = report.cleared_setid
        log.info("import: cleared set-id bits of %d entries (%s ...)", len(cleared), cleared[0])
    timings["unpack"] = time.monotonic() - started
    python = find_guest_python(tree)
    install_guest(tree, busybox, init_dir, workdir=workdir or image.config.working_dir or "/", python=python)
    started = time.monotonic()
    rootfs = work / IMPORTED_ROOTFS_NAME
    make_ext4(tree, rootfs, free_space_mb)
    timings["mkfs"] = time.monotonic() - started
    shutil.rmtree(tree)
    return rootfs
