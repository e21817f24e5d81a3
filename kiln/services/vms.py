"""VMs: the lifecycle state machine, admission control and the background loops.

Every transition is written to the database before it is acted on, and with a
compare-and-set on the old status, so concurrent actors (a DELETE, the boot
task, the reaper, the watchdog) never both win: whoever moves the VM into
``terminating`` or ``failed`` owns its teardown.

The service keeps the ``Machine`` of every VM it started or adopted in memory
(``self._machines``); routes that talk to a guest get it from ``running_machine``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import uuid
import weakref
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kiln.config import Settings
from kiln.runtime.agent_client import AgentError
from kiln.runtime.driver import BootImage, Hypervisor, Machine, MachineSpec, SavedState
from kiln.runtime.pool import settle_claimed
from kiln.runtime.snapshots import reset_identity
from kiln.schemas.vms import VMCreateRequest, VMUpdateRequest
from kiln.services.errors import (
    CapacityExhausted,
    Conflict,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    Unsupported,
    VmStartFailed,
)
from kiln.services.snapshots import SnapshotType
from kiln.services.vm_policy import CreatePlan, check_create, check_update
from kiln.store.db import Database
from kiln.store.models import Vm
from kiln.store.repositories import ResourceUsage, SessionRepository, VmRepository

if TYPE_CHECKING:
    from kiln.runtime.pool import WarmPool
    from kiln.services.snapshots import SnapshotService

log = logging.getLogger(__name__)


class VmStatus(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"


S = VmStatus
TRANSITIONS: dict[VmStatus, frozenset[VmStatus]] = {
    S.CREATING: frozenset({S.RUNNING, S.TERMINATING, S.FAILED}),
    S.RUNNING: frozenset({S.SUSPENDING, S.TERMINATING, S.FAILED}),
    S.SUSPENDING: frozenset({S.SUSPENDED, S.FAILED}),
    S.SUSPENDED: frozenset({S.RESUMING, S.TERMINATING, S.FAILED}),
    S.RESUMING: frozenset({S.RUNNING, S.FAILED}),
    S.TERMINATING: frozenset({S.TERMINATED, S.FAILED}),
    # A failed VM has no process left; deleting it records that the user is done with it.
    S.FAILED: frozenset({S.TERMINATING}),
    S.TERMINATED: frozenset(),
}

# What GET /v1/vms lists and what the reaper expires (InstaVM's "live").
LIVE_STATUSES = frozenset({S.CREATING, S.RUNNING, S.SUSPENDED})
# States in which a VM process exists or is being made or removed: admission counts these.
RESOURCE_HOLDING_STATUSES = frozenset(
    {S.CREATING, S.RUNNING, S.SUSPENDING, S.RESUMING, S.TERMINATING}
)
ENDED_STATUSES = frozenset({S.TERMINATED, S.FAILED})

CONSOLE_LOG_NAME = "console.log"
# How much of the console a failure reason quotes.
FAILURE_CONSOLE_BYTES = 2048
REAPER_INTERVAL_SECONDS = 1.0
WATCHDOG_INTERVAL_SECONDS = 2.0


class ImageSource(Protocol):
    """The part of ``kiln.runtime.images.ImageStore`` the VM service uses."""

    def variants(self) -> list[str]: ...

    def get(self, variant: str) -> BootImage | None: ...


def can_transition(current: str, target: VmStatus) -> bool:
    return target in TRANSITIONS[VmStatus(current)]


def metadata_contains(metadata: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """True when every key of ``wanted`` is in ``metadata`` with an equal value."""
    return all(key in metadata and metadata[key] == value for key, value in wanted.items())


def new_vm_id() -> str:
    # Also the guest's hostname, so only characters a hostname may hold.
    return "vm-" + secrets.token_hex(8)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _now() -> datetime:
    return datetime.now(UTC)


class VmService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        hypervisor: Hypervisor,
        images: ImageSource,
    ) -> None:
        self._settings = settings
        self._db = db
        self._hypervisor = hypervisor
        self._images = images
        self._machines: dict[str, Machine] = {}
        self._boot_tasks: dict[str, asyncio.Task[None]] = {}
        # Set by the app factory (it needs this service too); None: no snapshots,
        # every VM boots cold.
        self.snapshots: SnapshotService | None = None
        # Set by the app factory when KILN_POOL_SIZE > 0.
        self.pool: WarmPool | None = None
        # One save of a VM at a time; terminate waits for a save in progress.
        self._save_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._loops: list[asyncio.Task[None]] = []
        # Check-then-insert of admission must not interleave between two creates.
        self._admission_lock = asyncio.Lock()
        # Serialises teardown (terminate / fail) per VM; entries vanish when unused.
        self._teardown_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # -- service lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Adopt the VMs an earlier server left running, then start the loops."""
        await self.recover()
        self._loops = [
            self._spawn_loop("vm-reaper", self.reap_expired, REAPER_INTERVAL_SECONDS),
            self._spawn_loop("vm-watchdog", self.check_machines, WATCHDOG_INTERVAL_SECONDS),
        ]

    async def stop(self) -> None:
        """Stop the loops. Running VMs stay up for the next start to adopt;
        VMs still booting are failed and torn down (nobody could finish them)."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        for vm_id, task in list(self._boot_tasks.items()):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._fail(vm_id, "the server stopped while the VM was being created")
        for machine in self._machines.values():
            await machine.close_connections()
        self._machines.clear()

    # -- user operations -----------------------------------------------------------

    async def create(self, owner_id: int, request: VMCreateRequest, wait: bool) -> Vm:
        plan = check_create(request, self._settings, self._images.variants())
        source = None
        if self.snapshots is not None:
            # snapshot_id: the snapshot's shape and image (404 / 422 when it cannot be).
            plan, source = await self.snapshots.plan_source(owner_id, request, plan)
        elif request.snapshot_id is not None:
            raise InvalidRequest.single(("snapshot_id",), "this server has no snapshots")
        image = self._images.get(plan.image_variant)
        if image is None:
            raise ImageNotBuilt(
                f"image '{plan.image_variant}' is not built; "
                f"run kiln images build {plan.image_variant}"
            )
        # A create the host cannot take is refused before anything starts for it:
        # planning a restore may start a cold boot (a base snapshot of a new shape).
        # _admit checks again, atomically with the insert.
        async with self._db.transaction() as session:
            usage = await VmRepository(session).usage_any_owner(RESOURCE_HOLDING_STATUSES)
        self._check_capacity(usage, plan)
        # Fastest first: restore a saved VM (its snapshot, else the image's base
        # snapshot); cold boot only when there is none yet.
        restore = None
        if self.snapshots is not None:
            restore = await self.snapshots.plan_restore(plan, image, source)
        # Faster still: a VM of the warm pool, already restored from that base snapshot.
        claimed = None
        if self.pool is not None and restore is not None and restore.snapshot_id is None:
            claimed = self.pool.claim(restore.saved)
        try:
            vm = await self._admit(
                owner_id,
                plan,
                vm_id=claimed.vm_id if claimed else None,
                snapshot_id=restore.snapshot_id if restore else None,
                disk_snapshot_id=restore.disk_snapshot_id if restore else None,
            )
        except BaseException:
            if claimed is not None:
                await self._hypervisor.destroy(claimed.vm_id, claimed.run_dir)
                if self.pool is not None:
                    self.pool.refill()
            raise
        spec = self._machine_spec(vm, image, restore.saved if restore else None)
        self._start_boot(spec, plan.env, machine=claimed)
        if not wait:
            return vm
        # Shielded: a client that hangs up must not cancel the boot half-way.
        await asyncio.shield(self._boot_tasks[vm.id])
        vm = await self._reload(vm.id)
        if vm.status != S.RUNNING:
            raise VmStartFailed(vm.id, vm.failure_reason or f"the VM is {vm.status}")
        return vm

    async def list(
        self, owner_id: int, live_only: bool, metadata: dict[str, Any] | None = None
    ) -> list[Vm]:
        async with self._db.transaction() as session:
            vms = await VmRepository(session).list(
                owner_id, LIVE_STATUSES if live_only else None
            )
        if metadata:
            vms = [vm for vm in vms if metadata_contains(vm.labels, metadata)]
        return vms

    async def get(self, owner_id: int, vm_id: str) -> Vm:
        async with self._db.transaction() as session:
            vm = await VmRepository(session).get(owner_id, vm_id)
        if vm is None:
            raise NotFound(f"vm {vm_id} not found")
        return vm

    async def update(self, owner_id: int, vm_id: str, request: VMUpdateRequest) -> Vm:
        changes = check_update(request, self._settings)
        async with self._db.transaction() as session:
            vm = await VmRepository(session).get(owner_id, vm_id)
            if vm is None:
                raise NotFound(f"vm {vm_id} not found")
            if vm.status not in LIVE_STATUSES:
                raise Conflict(f"vm {vm_id} is {vm.status}")
            if "vm_lifetime_seconds" in changes:
                # A new lifetime counts from now: PATCH is how a client extends a VM.
                vm.expires_at = _now() + timedelta(seconds=changes["vm_lifetime_seconds"])
            if "metadata" in changes:
                vm.labels = changes["metadata"]
            for name in ("snapshot_on_terminate", "snapshot_name", "auto_suspend", "auto_resume"):
                if name in changes:
                    setattr(vm, name, changes[name])
            if "vault_ids" in changes:
                vm.vault_ids = changes["vault_ids"]
        return vm

    async def terminate(self, owner_id: int, vm_id: str) -> Vm:
        """Stop the VM and remove its files. Idempotent: an ended VM answers as it is."""
        await self.get(owner_id, vm_id)
        return await self._terminate(vm_id)

    async def console_tail(self, owner_id: int, vm_id: str, max_bytes: int) -> str:
        await self.get(owner_id, vm_id)
        return await asyncio.to_thread(self._read_console_tail, vm_id, max_bytes)

    async def running_machine(
        self, owner_id: int, vm_id: str, *, loaded: Vm | None = None
    ) -> Machine:
        """The process of a running VM of this owner, for routes that talk to the guest.

        ``loaded``: the VM's record, already read by the caller for this owner
        (saves a database round trip on every guest call)."""
        vm = loaded if loaded is not None and loaded.id == vm_id else await self.get(owner_id, vm_id)
        if vm.auto_resume and vm.status in (S.SUSPENDED, S.RESUMING):
            vm = await self.resume(owner_id, vm_id, wait=True)
        machine = self._machines.get(vm_id)
        if vm.status != S.RUNNING or machine is None:
            raise Conflict(f"vm {vm_id} is {vm.status}, not running")
        return machine

    # -- snapshots, suspend and resume (the saving itself: kiln.services.snapshots) --

    async def suspend(self, owner_id: int, vm_id: str) -> Vm:
        """Save the VM's memory and disk and stop its process (status suspended)."""
        vm = await self.get(owner_id, vm_id)
        snapshots = self._snapshot_service()
        if vm.status == S.SUSPENDED:
            return vm
        if vm.status != S.RUNNING or not await self._set_status(vm_id, S.RUNNING, S.SUSPENDING):
            raise Conflict(f"vm {vm_id} is {vm.status}; only a running VM can be suspended")
        try:
            await snapshots.save_before_teardown(vm, SnapshotType.SUSPEND, None)
        except Exception as error:
            await self._fail(vm_id, f"suspending failed: {_describe(error)}")
            return await self._reload(vm_id)
        self._machines.pop(vm_id, None)
        await self._set_status(vm_id, S.SUSPENDING, S.SUSPENDED)
        return await self._reload(vm_id)

    async def resume(self, owner_id: int, vm_id: str, wait: bool) -> Vm:
        """Restore a suspended VM from its saved state; it keeps its vm_id."""
        vm = await self.get(owner_id, vm_id)
        snapshots = self._snapshot_service()
        if vm.status == S.SUSPENDED:
            image = self._images.get(vm.image_variant)
            if image is None:
                raise ImageNotBuilt(f"image '{vm.image_variant}' is not built")
            if not await self._set_status(vm_id, S.SUSPENDED, S.RESUMING):
                raise Conflict(f"vm {vm_id} changed state meanwhile; try again")
            assert vm.disk_snapshot_id is not None, "a suspended VM has its saved state"
            spec = self._machine_spec(
                vm, image, await snapshots.saved_state_of(vm.disk_snapshot_id)
            )
            self._start_boot(spec, {}, current=S.RESUMING)
        elif vm.status not in (S.RESUMING, S.RUNNING):
            raise Conflict(f"vm {vm_id} is {vm.status}; only a suspended VM can be resumed")
        task = self._boot_tasks.get(vm_id)
        if not wait or task is None:
            return await self._reload(vm_id)
        await asyncio.shield(task)
        vm = await self._reload(vm_id)
        if vm.status != S.RUNNING:
            raise VmStartFailed(vm.id, vm.failure_reason or f"the VM is {vm.status}")
        return vm

    async def save_machine(
        self, vm_id: str, directory: Path, *, keep_running: bool
    ) -> tuple[SavedState, str | None]:
        """Save the VM's process into ``directory`` (``Hypervisor.save``), one save
        of a VM at a time. Returns the saved state and the snapshot the VM's disk
        was written on until now (the new snapshot's parent)."""
        # The states a VM is in for each kind of save (the caller moved it there).
        allowed = (S.RUNNING,) if keep_running else (S.SUSPENDING, S.TERMINATING)
        async with self._save_lock(vm_id):
            vm = await self._reload(vm_id)
            machine = self._machines.get(vm_id)
            if machine is None or vm.status not in allowed:
                raise Conflict(f"vm {vm_id} is {vm.status}; there is no running VM to save")
            saved = await self._hypervisor.save(machine, directory, keep_running=keep_running)
            if not keep_running:
                # Its process is gone: the watchdog must not take that for a crash.
                self._machines.pop(vm_id, None)
            return saved, vm.disk_snapshot_id

    async def _snapshot_before_terminate(self, vm: Vm) -> str | None:
        """``snapshot_on_terminate``: save a running VM (type auto) before it goes;
        a suspended VM's saved state becomes that snapshot. A failed save does not
        stop the termination (the snapshot is recorded as failed)."""
        # ``vm`` is the record as it was before it moved to terminating.
        if not vm.snapshot_on_terminate or self.snapshots is None:
            return None
        async with self._save_lock(vm.id):
            pass  # a snapshot being taken finishes first
        try:
            if vm.status == S.SUSPENDED and vm.disk_snapshot_id is not None:
                snapshot = await self.snapshots.adopt_suspend_state(
                    vm.disk_snapshot_id, vm.snapshot_name
                )
            elif vm.status == S.RUNNING and vm.id in self._machines:
                snapshot = await self.snapshots.save_before_teardown(
                    vm, SnapshotType.AUTO, vm.snapshot_name
                )
            else:
                return None
        except Exception as error:
            log.warning("vm %s: the snapshot before terminating failed: %s", vm.id, error)
            return None
        log.info("vm %s saved as snapshot %s before terminating", vm.id, snapshot.id)
        return snapshot.id

    def _snapshot_service(self) -> SnapshotService:
        if self.snapshots is None:
            raise Unsupported("snapshots are not available on this server")
        return self.snapshots

    def _save_lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._save_locks.get(vm_id)
        if lock is None:
            lock = asyncio.Lock()
            self._save_locks[vm_id] = lock
        return lock

    async def session_vm(self, owner_id: int, session_id: str) -> Vm:
        """The VM of a session: its live one, else its newest."""
        async with self._db.transaction() as session:
            vms = VmRepository(session)
            vm = await vms.for_session(owner_id, session_id, LIVE_STATUSES)
            if vm is None:
                vm = await vms.for_session(owner_id, session_id, list(VmStatus))
        if vm is None:
            raise NotFound(f"session {session_id} not found")
        return vm

    def run_dir(self, vm_id: str) -> Path:
        return self._settings.vms_dir / vm_id

    def _machine_spec(self, vm: Vm, image: BootImage, restore_from: SavedState | None) -> MachineSpec:
        """What starts ``vm``'s process: its shape and run dir, booted from
        ``image`` or continued from ``restore_from``."""
        return MachineSpec(
            vm_id=vm.id,
            vcpu_count=vm.vcpu_count,
            memory_mb=vm.memory_mb,
            image=image,
            run_dir=self.run_dir(vm.id),
            restore_from=restore_from,
        )

    # -- background work (one pass each; the loops call them, tests may too) -------

    async def reap_expired(self) -> None:
        async with self._db.transaction() as session:
            expired = await VmRepository(session).expired_any_owner(LIVE_STATUSES, _now())
        for vm_id in expired:
            log.info("vm %s reached the end of its lifetime", vm_id)
            await self._terminate(vm_id)

    async def check_machines(self) -> None:
        """Fail running VMs whose process is gone."""
        for vm_id, machine in list(self._machines.items()):
            if vm_id in self._boot_tasks or self._hypervisor.is_running(machine):
                continue  # a booting VM's own task notices a dead process
            if self._save_lock(vm_id).locked():
                continue  # a save (suspend, snapshot on terminate) stops it on purpose
            log.warning("vm %s: its QEMU process exited", vm_id)
            reason = "qemu process exited"
            console = await asyncio.to_thread(
                self._read_console_tail, vm_id, FAILURE_CONSOLE_BYTES
            )
            if console.strip():
                reason += f"\n--- console (last {FAILURE_CONSOLE_BYTES} bytes) ---\n{console}"
            await self._fail(vm_id, reason)

    async def recover(self) -> None:
        """After a (re)start: adopt VM processes, settle VMs caught mid-transition."""
        async with self._db.transaction() as session:
            unsettled = await VmRepository(session).list_any_owner(RESOURCE_HOLDING_STATUSES)
        for vm in unsettled:
            if vm.status == S.RUNNING:
                machine = await self._hypervisor.adopt(vm.id, self.run_dir(vm.id))
                if machine is not None:
                    self._machines[vm.id] = machine
                    log.info("vm %s adopted", vm.id)
                else:
                    await self._fail(vm.id, "not running after server restart")
            elif vm.status == S.TERMINATING:
                await self._terminate(vm.id)
            else:
                # Env values are never stored, so a half-made VM cannot be finished.
                await self._fail(vm.id, f"the server restarted while the VM was {vm.status}")
        await self._remove_leftovers()

    async def _remove_leftovers(self) -> None:
        """Tear down run dirs of ended VMs: a crash between recording a VM as failed
        and destroying it would otherwise leave its process running forever."""
        vms_dir = self._settings.vms_dir
        if not vms_dir.is_dir():
            return
        names = [path.name for path in vms_dir.iterdir() if path.name not in self._machines]
        async with self._db.transaction() as session:
            ended = await VmRepository(session).ids_in_status_any_owner(names, ENDED_STATUSES)
        for vm_id in ended:
            log.info("vm %s: removing what a crash left behind", vm_id)
            await self._hypervisor.destroy(vm_id, self.run_dir(vm_id))

    # -- internals -----------------------------------------------------------------

    async def _admit(
        self,
        owner_id: int,
        plan: CreatePlan,
        *,
        vm_id: str | None = None,
        snapshot_id: str | None = None,
        disk_snapshot_id: str | None = None,
    ) -> Vm:
        """Check the host's limits and insert the VM (status creating), atomically."""
        async with self._admission_lock, self._db.transaction() as session:
            vms = VmRepository(session)
            self._check_capacity(await vms.usage_any_owner(RESOURCE_HOLDING_STATUSES), plan)
            session_id = plan.session_id or str(uuid.uuid4())
            await SessionRepository(session).get_or_add(owner_id, session_id)
            if await vms.for_session(owner_id, session_id, LIVE_STATUSES) is not None:
                raise Conflict(f"session {session_id} already has a live VM")
            now = _now()
            return await vms.add(
                Vm(
                    id=vm_id or new_vm_id(),
                    owner_id=owner_id,
                    session_id=session_id,
                    status=S.CREATING,
                    vcpu_count=plan.vcpu_count,
                    memory_mb=plan.memory_mb,
                    image_variant=plan.image_variant,
                    labels=plan.metadata,
                    env_status="pending" if plan.env else "none",
                    egress_policy=plan.egress_policy,
                    volumes=[],
                    vault_ids=[],
                    snapshot_on_terminate=plan.snapshot_on_terminate,
                    snapshot_name=plan.snapshot_name,
                    snapshot_id=snapshot_id,
                    disk_snapshot_id=disk_snapshot_id,
                    auto_suspend=False,
                    auto_resume=False,
                    created_at=now,
                    updated_at=now,
                    expires_at=now + plan.lifetime,
                )
            )

    def _check_capacity(self, usage: ResourceUsage, plan: CreatePlan) -> None:
        """CapacityExhausted if the host's limits cannot take this VM as well."""
        settings = self._settings
        if usage.vms + 1 > settings.admission_max_vms:
            raise CapacityExhausted(f"the host runs its limit of {settings.admission_max_vms} VMs")
        if usage.memory_mb + plan.memory_mb > settings.admission_max_memory_mb:
            raise CapacityExhausted(
                f"not enough memory: {plan.memory_mb} MB asked, "
                f"{settings.admission_max_memory_mb - usage.memory_mb} MB free"
            )
        if usage.vcpus + plan.vcpu_count > settings.admission_max_vcpus:
            raise CapacityExhausted(
                f"not enough vCPUs: {plan.vcpu_count} asked, "
                f"{settings.admission_max_vcpus - usage.vcpus} free"
            )

    def _start_boot(
        self,
        spec: MachineSpec,
        env: dict[str, str],
        current: VmStatus = S.CREATING,
        machine: Machine | None = None,
    ) -> None:
        vm_id = spec.vm_id
        task = asyncio.create_task(
            self._boot(spec, env, current, machine), name=f"boot:{vm_id}"
        )
        self._boot_tasks[vm_id] = task
        task.add_done_callback(lambda _: self._boot_tasks.pop(vm_id, None))

    async def _boot(
        self,
        spec: MachineSpec,
        env: dict[str, str],
        current: VmStatus = S.CREATING,
        claimed: Machine | None = None,
    ) -> None:
        """Start the VM's process (or take ``claimed``, a warm pool VM already
        running) and make it running; ``current`` is creating, or resuming for a
        suspended VM (whose env is already in its memory)."""
        vm_id = spec.vm_id
        try:
            machine = claimed or await self._hypervisor.start(spec)
            self._machines[vm_id] = machine
            if claimed is not None:
                # Ready, with its identity (hostname: vm_id) since the pool filled;
                # only its clock moved on meanwhile.
                drift_ns = await settle_claimed(machine)
                log.debug("vm %s claimed from the pool; its clock was off by %.1f ms",
                          vm_id, drift_ns / 1e6)  # fmt: skip
            else:
                # Raises BootError quoting the console if the guest never answers or QEMU dies.
                await machine.wait_ready(self._settings.boot_timeout_seconds)
                # A restored guest must not share randomness, time or name with its siblings.
                await reset_identity(machine, vm_id)
            env_status, env_error = "none", None
            if env:
                try:
                    await machine.agent.call("set_env", env=env)
                    env_status = "applied"
                except AgentError as error:
                    env_status, env_error = "failed", _describe(error)
            env_fields = {"env_status": env_status, "env_error": env_error}
            # False when a DELETE or the reaper moved the VM on meanwhile; they tear it down.
            await self._set_status(
                vm_id, current, S.RUNNING, **(env_fields if current == S.CREATING else {})
            )
        except asyncio.CancelledError:
            raise  # whoever cancelled the boot (terminate, stop) cleans up
        except Exception as error:
            log.warning("vm %s failed to start: %s", vm_id, _describe(error))
            await self._fail(vm_id, _describe(error))
        finally:
            if claimed is not None and self.pool is not None:
                # Handed out (or failed): only now may a restore take the CPU.
                self.pool.refill()

    async def _terminate(self, vm_id: str) -> Vm:
        async with self._teardown_lock(vm_id):
            # Retried because the boot task may move the VM on between read and write.
            while True:
                vm = await self._reload(vm_id)
                if vm.status == S.TERMINATED:
                    return vm
                if vm.status == S.TERMINATING:
                    break
                if not can_transition(vm.status, S.TERMINATING):
                    raise Conflict(f"vm {vm_id} is {vm.status} and cannot be terminated now")
                if await self._set_status(vm_id, vm.status, S.TERMINATING):
                    break
            await self._stop_boot(vm_id)
            snapshot_id = await self._snapshot_before_terminate(vm)
            await self._destroy(vm_id)
            await self._set_status(
                vm_id,
                S.TERMINATING,
                S.TERMINATED,
                terminated_at=_now(),
                terminate_snapshot_id=snapshot_id,
            )
            return await self._reload(vm_id)

    async def _fail(self, vm_id: str, reason: str) -> None:
        """Record the VM as failed, then tear it down."""
        async with self._teardown_lock(vm_id):
            vm = await self._reload(vm_id)
            if vm.status in ENDED_STATUSES:
                return
            if not await self._set_status(vm_id, vm.status, S.FAILED, failure_reason=reason):
                return
            await self._destroy(vm_id)

    async def _stop_boot(self, vm_id: str) -> None:
        task = self._boot_tasks.get(vm_id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _destroy(self, vm_id: str) -> None:
        self._machines.pop(vm_id, None)
        await self._hypervisor.destroy(vm_id, self.run_dir(vm_id))

    async def _set_status(
        self, vm_id: str, current: str, target: VmStatus, **fields: Any
    ) -> bool:
        """Persist one transition; False if the VM is no longer in ``current``."""
        if not can_transition(current, target):
            return False
        async with self._db.transaction() as session:
            return await VmRepository(session).compare_and_set_status(
                vm_id, current, target, **fields
            )

    async def _reload(self, vm_id: str) -> Vm:
        async with self._db.transaction() as session:
            vm = await VmRepository(session).get_any_owner(vm_id)
        if vm is None:
            raise NotFound(f"vm {vm_id} not found")
        return vm

    def _teardown_lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._teardown_locks.get(vm_id)
        if lock is None:
            lock = asyncio.Lock()
            self._teardown_locks[vm_id] = lock
        return lock

    def _read_console_tail(self, vm_id: str, max_bytes: int) -> str:
        path = self.run_dir(vm_id) / CONSOLE_LOG_NAME
        try:
            with path.open("rb") as console:
                size = console.seek(0, os.SEEK_END)
                console.seek(max(size - max_bytes, 0))
                return console.read(max_bytes).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn_loop(
        self, name: str, one_pass: Callable[[], Coroutine[Any, Any, None]], interval: float
    ) -> asyncio.Task[None]:
        async def run() -> None:
            while True:
                try:
                    await one_pass()
                except Exception:
                    # A bad pass (e.g. the database briefly locked) must not end the loop.
                    log.exception("%s pass failed", name)
                await asyncio.sleep(interval)

        return asyncio.create_task(run(), name=name)
