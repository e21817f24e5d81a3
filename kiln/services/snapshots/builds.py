"""Snapshots built in a builder VM (``POST /v1/snapshots`` whose ``oci_image``
names an image variant of this server, with ``build_args``).

The record is made ``creating`` and the request answered at once; in the
background a builder VM is created for the caller (a VM like theirs, restored
from the variant's base snapshot, labelled ``kiln_build: <snapshot id>``, its
egress limited to the build's mirrors or the package-manager group:
``build_plan.egress_policy``), the steps of ``build_plan.steps`` run in it one
by one (after the disk is grown to ``disk_size_gb``: ``build_disk``), each
step's title and output going to the record's ``build_log`` as they come,
``envs`` are given to the agent (kept in ``/etc/environment``), and the VM is
saved into the record, which ends ``ready`` (a user snapshot like
any other) or ``failed`` with the reason. The builder VM is terminated either
way; one a stopped server left is terminated at the next start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from kiln.config import Settings
from kiln.schemas.snapshots import SnapshotImportRequest
from kiln.schemas.vms import VMCreateRequest
from kiln.services.background import BackgroundTasks
from kiln.services.errors import CapacityExhausted, FieldProblem, InvalidRequest
from kiln.services.events.record import record as record_event
from kiln.services.events.record import snapshot_event
from kiln.services.snapshots.build_disk import check_disk_size, filesystem_step
from kiln.services.snapshots.build_plan import BuildPlan, BuildStep, check_build_args, egress_policy, steps
from kiln.services.snapshots.requests import add_creating, check_basics
from kiln.services.snapshots.rows import record, reload
from kiln.services.states import LIVE_STATUSES, SnapshotStatus
from kiln.services.vms import VmService
from kiln.store.models import Snapshot
from kiln.store.repositories import VmRepository

log = logging.getLogger(__name__)

BUILD_LABEL = "kiln_build"
# The log keeps its tail: a chatty install must not grow a row without end.
BUILD_LOG_MAX_CHARS = 64 * 1024
LOG_FLUSH_SECONDS = 2.0
STOPPED_REASON = "the server stopped while the snapshot was being built"


class BuildLog:
    """A build's progress, written to its record at each step and every few
    seconds while a step prints."""

    def __init__(self, flush: Callable[[str], Awaitable[None]]) -> None:
        self._text = ""
        self._flush = flush
        self._flushed_at = 0.0

    @property
    def text(self) -> str:
        return self._text

    async def add(self, text: str, *, now: bool = False) -> None:
        self._text += text
        if len(self._text) > BUILD_LOG_MAX_CHARS:
            self._text = "[...]\n" + self._text[-BUILD_LOG_MAX_CHARS:]
        if now or time.monotonic() - self._flushed_at >= LOG_FLUSH_SECONDS:
            self._flushed_at = time.monotonic()
            await self._flush(self._text)


class ImageBuilder:
    def __init__(
        self,
        settings: Settings,
        vms: VmService,
        background: BackgroundTasks,
        variant_packages: Callable[[str], tuple[str, ...]],
    ) -> None:
        self._settings = settings
        self._vms = vms
        self._db = vms.db
        self._background = background
        # The Debian packages a variant's image installs (npm needs npm).
        self._variant_packages = variant_packages

    def builds_on(self, oci_image: str) -> bool:
        """True when ``oci_image`` names an image variant (a build, not an import)."""
        return oci_image in self._vms.image_variants()

    async def build(self, owner_id: int, request: SnapshotImportRequest) -> Snapshot:
        """Check the body (every problem a 422 at its key), make the record
        ``creating`` and start the build; its outcome is on the record."""
        snapshot, _ = await self.start(owner_id, request)
        return snapshot

    async def start(self, owner_id: int, request: SnapshotImportRequest) -> tuple[Snapshot, asyncio.Task[None]]:
        """``build``, and the task that runs it (what ``system_builds`` waits for)."""
        variant = request.oci_image
        problems: list[FieldProblem] = []
        checked = check_basics(request, self._settings, problems)
        plan, arg_problems = check_build_args(request.build_args or {}, self._variant_packages(variant), variant)
        disk_bytes, disk_problems = check_disk_size(
            request.build_args or {}, self._vms.image_disk_bytes(variant), self._settings.max_build_disk_gb
        )
        problems += arg_problems + disk_problems
        if problems:
            raise InvalidRequest(problems)
        if disk_bytes is not None:
            await self._check_disk_room(disk_bytes, disk_bytes)
            plan = replace(plan, disk_bytes=disk_bytes)
        async with self._db.transaction() as session:
            snapshot = await add_creating(
                session, self._settings, owner_id, request.name, checked, variant, build_log=""
            )
            await record_event(session, snapshot_event(snapshot, "snapshot.created"))
        return snapshot, self._background.run(self._build(owner_id, snapshot.id, plan), f"build {snapshot.id}")

    async def _build(self, owner_id: int, snapshot_id: str, plan: BuildPlan) -> None:
        snapshot = await reload(self._db, snapshot_id)

        async def flush(text: str) -> None:
            await record(self._db, snapshot_id, None, build_log=text)

        progress = BuildLog(flush)
        vm_id: str | None = None
        started = time.monotonic()
        try:
            policy = egress_policy(plan, self._settings)
            await progress.add(f"== builder VM ({snapshot.image_variant}; egress {policy or 'none'})\n", now=True)
            vm = await self._vms.create(
                owner_id,
                VMCreateRequest(
                    vcpu_count=snapshot.vcpu_count,
                    memory_mb=snapshot.memory_mb,
                    image_variant=snapshot.image_variant,
                    egress_policy=policy,
                    metadata={BUILD_LABEL: snapshot_id},
                    vm_lifetime_seconds=self._settings.max_lifetime_seconds,
                ),
                wait=True,
            )
            vm_id = vm.id
            if policy is not None and vm.network_error:
                raise BuildFailed(f"the builder VM has no network: {vm.network_error}")
            # From here a restart settles the save as any other (settle_interrupted_save).
            await record(self._db, snapshot_id, None, source_vm_id=vm_id, parent_id=vm.disk_snapshot_id)
            await progress.add(f"   {vm_id} running\n", now=True)
            if plan.disk_bytes is not None:
                # Checked again: the builder holds its image's disk; the growth is what is new.
                await self._check_disk_room(plan.disk_bytes - self._vms.image_disk_bytes(snapshot.image_variant),
                                            plan.disk_bytes)  # fmt: skip
                await self._vms.node.grow_root_disk(vm_id, plan.disk_bytes)
                await self._run_step(owner_id, vm_id, filesystem_step(plan.disk_bytes), plan.envs, progress)
            for step in steps(plan, self._settings):
                await self._run_step(owner_id, vm_id, step, plan.envs, progress)
            if plan.envs:
                machine = await self._vms.running_machine(owner_id, vm_id)
                await machine.agent.call("set_env", env=plan.envs, timeout=30)
                await progress.add(f"== envs: {', '.join(sorted(plan.envs))}\n")
            await progress.add("== saving the snapshot\n", now=True)
            await self._vms.snapshots.save_build(vm_id, snapshot_id)
            await progress.add(f"== ready in {time.monotonic() - started:.0f}s\n", now=True)
        except BaseException as error:
            reason = str(error) or type(error).__name__
            if isinstance(error, asyncio.CancelledError):
                reason = STOPPED_REASON
            log.warning("building snapshot %s failed: %s", snapshot_id, reason)
            with contextlib.suppress(Exception):
                current = await reload(self._db, snapshot_id)
                if current.status == SnapshotStatus.CREATING:
                    await record(
                        self._db, snapshot_id, None, status=SnapshotStatus.FAILED, failure_reason=reason,
                        build_log=progress.text + f"== failed: {reason}\n",
                    )  # fmt: skip
            raise
        finally:
            if vm_id is not None:
                # Shielded: a server stopping mid-build still ends its builder.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._vms.terminate(owner_id, vm_id))

    async def _run_step(
        self, owner_id: int, vm_id: str, step: BuildStep, envs: dict[str, str], progress: BuildLog
    ) -> None:
        await progress.add(f"== {step.title}\n", now=True)
        machine = await self._vms.running_machine(owner_id, vm_id)
        result: dict[str, object] = {}
        tail = ""
        async for frame in machine.agent.stream(
            "exec", shell=step.shell, env=envs, timeout=self._settings.build_step_timeout_seconds
        ):
            if frame.get("kind") in ("stdout", "stderr"):
                text = base64.b64decode(frame["data"]).decode(errors="replace")
                tail = (tail + text)[-400:]
                await progress.add(text)
            elif frame.get("kind") == "result":
                result = frame["value"]
        code = result.get("exit_code")
        if result.get("timed_out"):
            raise BuildFailed(f"step {step.title!r} took longer than {self._settings.build_step_timeout_seconds:.0f}s")
        if code != 0:
            last = tail.strip().splitlines()[-1:] or [""]
            raise BuildFailed(f"step {step.title!r} exited with {code}: {last[0]}")

    async def _check_disk_room(self, needed_bytes: int, disk_bytes: int) -> None:
        """503 (a failed build, once it runs) when the host's disk cannot hold the bigger disk."""
        try:
            await asyncio.to_thread(self._vms.disk.check_create, needed_bytes)
        except CapacityExhausted as error:
            raise CapacityExhausted(f"build_args.disk_size_gb={disk_bytes >> 30}: {error}") from error

    async def remove_unfinished(self) -> None:
        """Builder VMs a stopped server left (their builds were failed by
        ``SnapshotService.fail_unfinished``): terminated."""
        async with self._db.transaction() as session:
            vms = await VmRepository(session).list_any_owner(LIVE_STATUSES)
        for vm in vms:
            if BUILD_LABEL in (vm.labels or {}):
                log.info("terminating %s, the builder VM of an unfinished build", vm.id)
                with contextlib.suppress(Exception):
                    await self._vms.terminate(vm.owner_id, vm.id)


class BuildFailed(Exception):
    """A step of the build failed; ``str()`` says which and how."""
