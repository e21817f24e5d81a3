"""VMs: the lifecycle state machine, admission, and the background loops.

Every transition is written to the database before it is acted on, and with a
compare-and-set on the old status, so concurrent actors (a DELETE, the boot
task, the reaper, the watchdog) never both win: whoever moves the VM into
``terminating`` or ``failed`` owns its teardown.

What happens on the host is the node's (``kiln.node.Node``): every way a VM
comes up (cold boot, restore, pool claim, clone, resume) is ``node.start`` or
``node.claim``, every way it goes away is ``node.stop``; the pipeline's
participants do the rest. Recovery after a restart is ``vm_recovery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.node.network import EgressRefused, check_rules
from kiln.node.node import Node
from kiln.node.participant import SavedDrive, VmContext
from kiln.node.pool import WarmPool
from kiln.runtime.driver import BootImage, Machine, SavedState
from kiln.runtime.errors import AgentError, RuntimeFailure
from kiln.schemas.vms import VMCreateRequest, VMUpdateRequest
from kiln.services.activity import Activity
from kiln.services.admission import Admission
from kiln.services.disk_budget import DiskBudget
from kiln.services.egress_policy import EgressPolicies, network_error
from kiln.services.errors import (
    CapacityExhausted,
    Conflict,
    ImageNotBuilt,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    VmStartFailed,
)
from kiln.services.events.record import NewEvent, by_user, record, record_alone, vm_event
from kiln.services.events.vm_events import created_event, transition_event
from kiln.services.snapshots.restore import RestorePlanner
from kiln.services.snapshots.service import SnapshotService
from kiln.services.states import (
    ENDED_STATUSES,
    LIVE_STATUSES,
    RESOURCE_HOLDING_STATUSES,
    SnapshotStatus,
    SnapshotType,
    VmStatus,
    can_transition,
)
from kiln.services.telemetry import NoTelemetry, Telemetry
from kiln.services.usage import ledger_transition
from kiln.services.vault_bindings import VaultBindings
from kiln.services.vm_policy import CreatePlan, check_create, check_update
from kiln.services.volumes.mounts import MountPlan, VolumeMounts, vm_mounts
from kiln.store.db import Database
from kiln.store.models import Snapshot, Vm
from kiln.store.repositories import HostResourceRepository, SessionRepository, SnapshotRepository, VmRepository

log = logging.getLogger(__name__)

# Runs in the transaction that inserts a new VM (e.g. the share of ``share``).
AdmitHook = Callable[[AsyncSession, Vm, CreatePlan], Awaitable[None]]

S = VmStatus

# How much of the console a failure reason quotes.
FAILURE_CONSOLE_BYTES = 2048
REAPER_INTERVAL_SECONDS = 1.0
WATCHDOG_INTERVAL_SECONDS = 2.0
RECONCILE_INTERVAL_SECONDS = 30.0


class ImageSource(Protocol):
    """The part of ``kiln.runtime.images.ImageStore`` the VM service uses."""

    def variants(self) -> list[str]: ...

    def get(self, variant: str) -> BootImage | None: ...


def metadata_contains(metadata: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """True when every key of ``wanted`` is in ``metadata`` with an equal value."""
    return all(key in metadata and metadata[key] == value for key, value in wanted.items())


def new_vm_id() -> str:
    # Also the guest's hostname, so only characters a hostname may hold.
    return "vm-" + secrets.token_hex(8)


def disk_bytes(image: BootImage) -> int:
    """How large a VM's disk may grow: its image's (the rootfs's virtual size)."""
    try:
        return Path(image.rootfs).stat().st_size
    except OSError:
        return 0


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _now() -> datetime:
    return datetime.now(UTC)


class VmService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        node: Node,
        images: ImageSource,
        snapshots: SnapshotService,
        planner: RestorePlanner,
        admission: Admission,
        disk: DiskBudget,
        vault_bindings: VaultBindings,
        pool: WarmPool | None = None,
        mounts: VolumeMounts | None = None,
        *,
        egress: EgressPolicies,
    ) -> None:
        self._settings = settings
        # Stored egress policies into the node's rules (with the package-manager group).
        self.egress = egress
        self.db = db
        self.node = node
        self._images = images
        self.snapshots = snapshots
        self.planner = planner
        self.admission = admission
        self.disk = disk
        self.pool = pool
        self.mounts = mounts
        self.vault_bindings = vault_bindings
        self._boot_tasks: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        # Serialises teardown (terminate / fail) per VM; entries vanish when unused.
        self._teardown_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # When each VM was last used (guest calls here, share traffic from the router).
        self.activity = Activity()
        self.admit_hooks: list[AdmitHook] = []
        # The operator's metrics (the app sets its own; kiln.services.telemetry).
        self.telemetry: Telemetry = NoTelemetry()

    # -- service lifecycle -------------------------------------------------------

    def start_loops(self) -> None:
        self._loops = [
            self._spawn_loop("vm-reaper", self.reap_expired, REAPER_INTERVAL_SECONDS),
            self._spawn_loop("vm-watchdog", self.check_machines, WATCHDOG_INTERVAL_SECONDS),
            self._spawn_loop("vm-reconciler", self.reconcile, RECONCILE_INTERVAL_SECONDS),
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
            await self.fail(vm_id, "the server stopped while the VM was being created")
        for _, machine in self.node.machines.items():
            await machine.close_connections()

    # -- user operations -----------------------------------------------------------

    async def create(self, owner_id: int, request: VMCreateRequest, wait: bool) -> Vm:
        try:
            return await self._create(owner_id, request, wait)
        except (QuotaExceeded, CapacityExhausted) as refusal:
            # A refusal changes nothing, so its event has a transaction of its own.
            kind = "quota.refused" if isinstance(refusal, QuotaExceeded) else "capacity.refused"
            self.telemetry.admission_refused(kind.partition(".")[0])
            payload = {"vcpu_count": request.vcpu_count, "memory_mb": request.memory_mb}
            refused = NewEvent(kind, owner_id, status="denied", payload=payload, error_message=str(refusal))
            await record_alone(self.db, replace(refused, session_id=request.session_id, **by_user(owner_id)))
            raise

    async def _create(self, owner_id: int, request: VMCreateRequest, wait: bool) -> Vm:
        started = time.monotonic()
        plan = check_create(request, self._settings, self._images.variants())
        self._check_egress(plan.egress_policy)
        vault_ids = await self.vault_bindings.checked_ids(owner_id, request.vault_ids)
        # snapshot_id: the snapshot's shape and image (404 / 422 when it cannot be).
        plan, source = await self.planner.plan_source(owner_id, request, plan)
        mounts = MountPlan()
        if self.mounts is not None:
            # 404 / 409 / 422 before anything starts; a snapshot's volumes come back with it.
            mounts = await self.mounts.plan(
                owner_id, request.volumes, source.id if source else None, source.mounts if source else ()
            )
        image = self._images.get(plan.image_variant)
        if image is None:
            raise ImageNotBuilt(
                f"image '{plan.image_variant}' is not built; "
                f"run kiln images build {plan.image_variant}"
            )
        # A create the host or the user's quota cannot take is refused before
        # anything starts for it: planning a restore may start a cold boot (a
        # base snapshot of a new shape). _admit checks again, atomically with the insert.
        async with self.db.transaction() as session:
            await self.admission.check(session, owner_id, plan.memory_mb, plan.vcpu_count)
        await asyncio.to_thread(lambda: self.disk.check_create(self._disk_bytes_from(image, source)))
        # Fastest first: restore a saved VM (its snapshot, else the image's base
        # snapshot); cold boot only when there is none yet.
        restore = await self.planner.plan_restore(plan, image, source)
        # Faster still: a VM of the warm pool, already restored from that base snapshot.
        claimed = None
        if self.pool is not None and restore is not None and restore.snapshot_id is None:
            claimed = self.pool.claim(restore.saved)
        try:
            vm = await self._admit(
                owner_id,
                plan,
                vault_ids,
                vm_id=claimed.vm_id if claimed else None,
                snapshot_id=restore.snapshot_id if restore else None,
                disk_snapshot_id=restore.disk_snapshot_id if restore else None,
                mounts=mounts,
            )
        except BaseException:
            if claimed is not None:
                await self.node.stop(claimed.vm_id)
                if self.pool is not None:
                    self.pool.refill()
            raise
        context = self.context(vm, image, restore.saved if restore else None, saved_drives=mounts.saved_drives)
        self._start_boot(context, plan.env, claimed=claimed)
        if not wait:
            return vm
        path = "pool" if claimed is not None else "restore" if restore is not None else "cold"
        try:
            running = await self._wait_running(vm.id)
        except VmStartFailed:
            self.telemetry.vm_create_finished(path, time.monotonic() - started, ok=False)
            raise
        self.telemetry.vm_create_finished(path, time.monotonic() - started, ok=True)
        return running

    async def clone(self, owner_id: int, vm_id: str, request: VMCreateRequest, wait: bool) -> Vm:
        """Snapshot the VM (named ``request.snapshot_name``) and create a new VM
        from that snapshot with the other create fields of ``request``."""
        if request.snapshot_id is not None:
            raise InvalidRequest.single(
                ("snapshot_id",), "a clone starts from the VM itself; leave snapshot_id out"
            )
        if request.egress_policy is None:
            # A clone reaches what its source reaches unless the request says otherwise.
            source = await self.get(owner_id, vm_id)
            request = request.model_copy(update={"egress_policy": source.egress_policy})
        if self.mounts is not None:
            await self.mounts.check_clone(owner_id, vm_id)
        snapshot = await self.snapshots.snapshot_vm(owner_id, vm_id, request.snapshot_name, wait=True)
        if snapshot.status != SnapshotStatus.READY:
            raise Conflict(f"vm {vm_id} could not be snapshotted: {snapshot.failure_reason}")
        create = request.model_copy(update={"snapshot_id": snapshot.id, "snapshot_name": None})
        return await self.create(owner_id, create, wait)

    async def list(
        self, owner_id: int, live_only: bool, metadata: dict[str, Any] | None = None
    ) -> list[Vm]:
        async with self.db.transaction() as session:
            vms = await VmRepository(session).list(owner_id, LIVE_STATUSES if live_only else None)
        if metadata:
            vms = [vm for vm in vms if metadata_contains(vm.labels or {}, metadata)]
        return vms

    def image_variants(self) -> frozenset[str]:
        """The variants this host has an image of (what a create may ask for)."""
        return frozenset(self._images.variants())

    def _disk_bytes_from(self, image: BootImage, source: Snapshot | None) -> int:
        """How large a VM's disk may grow (blocking): that of the snapshot it
        stands on, which a build's ``disk_size_gb`` may have made larger than its image's."""
        if source is not None:
            with contextlib.suppress(RuntimeFailure):
                return max(self.node.saved_state(Path(source.directory)).disk_bytes, disk_bytes(image))
        return disk_bytes(image)

    def image_disk_bytes(self, variant: str) -> int:
        """How large the disk of a VM of ``variant`` is when it starts from the image (0: not built)."""
        image = self._images.get(variant)
        return disk_bytes(image) if image is not None else 0

    async def get(self, owner_id: int, vm_id: str) -> Vm:
        async with self.db.transaction() as session:
            vm = await VmRepository(session).get(owner_id, vm_id)
        if vm is None:
            raise NotFound(f"vm {vm_id} not found")
        return vm

    async def update(self, owner_id: int, vm_id: str, request: VMUpdateRequest) -> Vm:
        changes = check_update(request, self._settings)
        if "vault_ids" in changes:
            changes["vault_ids"] = await self.vault_bindings.checked_ids(owner_id, changes["vault_ids"])
        async with self.db.transaction() as session:
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
            await record(session, vm_event(vm, "vm.updated", payload={"fields": sorted(changes)}, **by_user(owner_id)))
        if "vault_ids" in changes and vm.status in (S.CREATING, S.RUNNING):
            await self.vault_bindings.apply(vm)  # the next request already has (or lacks) them
        return vm

    async def terminate(self, owner_id: int, vm_id: str) -> Vm:
        """Stop the VM and remove its files. Idempotent: an ended VM answers as it is."""
        await self.get(owner_id, vm_id)
        return await self._terminate(vm_id)

    async def console_tail(self, owner_id: int, vm_id: str, max_bytes: int) -> str:
        await self.get(owner_id, vm_id)
        return await self.node.console_tail(vm_id, self.run_dir(vm_id), max_bytes)

    async def running_machine(self, owner_id: int, vm_id: str, *, loaded: Vm | None = None) -> Machine:
        """The process of a running VM of this owner, for routes that talk to the guest.

        ``loaded``: the VM's record, already read by the caller for this owner
        (saves a database round trip on every guest call)."""
        vm = loaded if loaded is not None and loaded.id == vm_id else await self.get(owner_id, vm_id)
        self.activity.touch(vm_id)
        if vm.auto_resume and vm.status in (S.SUSPENDED, S.RESUMING):
            vm = await self.resume(owner_id, vm_id, wait=True)
        machine = self.node.machine(vm_id)
        if vm.status != S.RUNNING or machine is None:
            raise Conflict(f"vm {vm_id} is {vm.status}, not running")
        return machine

    async def session_vm(self, owner_id: int, session_id: str) -> Vm:
        """The VM of a session: its live one, else its newest."""
        async with self.db.transaction() as session:
            vms = VmRepository(session)
            vm = await vms.for_session(owner_id, session_id, LIVE_STATUSES)
            if vm is None:
                vm = await vms.for_session(owner_id, session_id, list(VmStatus))
        if vm is None:
            raise NotFound(f"session {session_id} not found")
        return vm

    # -- suspend and resume (the saving itself: kiln.services.snapshots) -----------

    async def suspend(self, owner_id: int, vm_id: str) -> Vm:
        """Save the VM's memory and disk and stop its process (status suspended)."""
        vm = await self.get(owner_id, vm_id)
        if vm.status == S.SUSPENDED:
            return vm
        if vm.status != S.RUNNING or not await self.set_status(vm_id, S.RUNNING, S.SUSPENDING):
            raise Conflict(f"vm {vm_id} is {vm.status}; only a running VM can be suspended")
        try:
            await self.snapshots.save_before_teardown(vm, SnapshotType.SUSPEND, None)
        except Exception as error:
            if self.node.is_running(vm_id):
                # Nothing was lost: the VM goes on as it was.
                await self.set_status(vm_id, S.SUSPENDING, S.RUNNING)
                raise Conflict(f"vm {vm_id} could not be suspended: {describe(error)}") from error
            await self.fail(vm_id, f"suspending failed: {describe(error)}")
            return await self.reload(vm_id)
        await self.node.stop(vm_id, suspending=True)
        await self.set_status(vm_id, S.SUSPENDING, S.SUSPENDED, failure_reason=None)
        return await self.reload(vm_id)

    async def resume(self, owner_id: int, vm_id: str, wait: bool) -> Vm:
        """Restore a suspended VM from its saved state; it keeps its vm_id. A
        resume that fails leaves it suspended (retryable), with the reason."""
        vm = await self.get(owner_id, vm_id)
        if vm.status == S.SUSPENDED:
            image = self._images.get(vm.image_variant)
            if image is None:
                raise ImageNotBuilt(f"image '{vm.image_variant}' is not built")
            async with self.db.transaction() as session:
                needed = await self._disk_bytes_of(session, vm, image)
            await asyncio.to_thread(self.disk.check_create, needed)
            if not await self.set_status(vm_id, S.SUSPENDED, S.RESUMING):
                raise Conflict(f"vm {vm_id} changed state meanwhile; try again")
            # Read again: a policy stored while it was suspended is the one it resumes with.
            vm = await self.reload(vm_id)
            if (error := network_error(vm.egress_policy, self.node)) != vm.network_error:
                async with self.db.transaction() as session:
                    await VmRepository(session).compare_and_set_status(
                        vm_id, S.RESUMING, S.RESUMING, network_error=error
                    )
            assert vm.disk_snapshot_id is not None, "a suspended VM has its saved state"
            saved = await self.snapshots.saved_state_of(vm.disk_snapshot_id)
            self._start_boot(self.context(vm, image, saved), {}, current=S.RESUMING)
        elif vm.status not in (S.RESUMING, S.RUNNING):
            raise Conflict(f"vm {vm_id} is {vm.status}; only a suspended VM can be resumed")
        if not wait or vm_id not in self._boot_tasks:
            return await self.reload(vm_id)
        return await self._wait_running(vm_id)

    # -- for the other services and the recovery -------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._settings.data_dir

    def run_dir(self, vm_id: str) -> Path:
        return self._settings.vms_dir / vm_id

    def context(
        self,
        vm: Vm,
        image: BootImage,
        restore_from: SavedState | None,
        saved_drives: tuple[SavedDrive, ...] = (),
    ) -> VmContext:
        """What the pipeline needs to bring ``vm`` up from ``image`` or ``restore_from``
        (``saved_drives``: the volume drives that snapshot was saved with).
        Where the host wires networks every VM gets one, filtered by its policy
        (none given: nothing is reachable); elsewhere it gets none at all."""
        return VmContext(
            vm_id=vm.id,
            owner_id=vm.owner_id,
            vcpu_count=vm.vcpu_count,
            memory_mb=vm.memory_mb,
            image=image,
            run_dir=self.run_dir(vm.id),
            restore_from=restore_from,
            egress=self.egress.rules(vm.egress_policy) if self.node.wires_networks else None,
            mounts=vm_mounts(vm),
            saved_drives=saved_drives,
            resuming=vm.status == S.SUSPENDED,
        )

    def booting(self, vm_id: str) -> bool:
        return vm_id in self._boot_tasks

    async def wait_booted(self, vm_id: str) -> Vm:
        """The VM's record once a boot in progress (create, resume) has ended, whatever its outcome."""
        task = self._boot_tasks.get(vm_id)
        if task is not None:
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        return await self.reload(vm_id)

    async def set_status(self, vm_id: str, current: str, target: VmStatus, **fields: Any) -> bool:
        """Persist one transition; False if the VM is no longer in ``current``."""
        if not can_transition(current, target):
            return False
        async with self.db.transaction() as session:
            vms = VmRepository(session)
            if not await vms.compare_and_set_status(vm_id, current, target, **fields):
                return False
            # The event commits with the transition (an outbox: never one without the other).
            vm = await vms.get_any_owner(vm_id)
            if vm is not None:
                await record(session, transition_event(vm, current, target, fields.get("failure_reason")))
                await ledger_transition(session, vm, current, target, await self._disk_mb(session, vm))
            return True

    async def _disk_mb(self, session: AsyncSession, vm: Vm) -> int:
        """What the VM's disk may grow to (the usage ledger's disk)."""
        image = self._images.get(vm.image_variant)
        return (await self._disk_bytes_of(session, vm, image)) >> 20 if image is not None else 0

    async def _disk_bytes_of(self, session: AsyncSession, vm: Vm, image: BootImage) -> int:
        """What the VM's disk may grow to: its saved disk's size when it stands
        on one (a build may have grown it), else its image's."""
        saved = None
        if vm.disk_snapshot_id is not None:
            saved = await SnapshotRepository(session).get_any_owner(vm.disk_snapshot_id)
        return await asyncio.to_thread(self._disk_bytes_from, image, saved)

    async def reload(self, vm_id: str) -> Vm:
        async with self.db.transaction() as session:
            vm = await VmRepository(session).get_any_owner(vm_id)
        if vm is None:
            raise NotFound(f"vm {vm_id} not found")
        return vm

    async def fail(self, vm_id: str, reason: str) -> None:
        """Record the VM as failed, then tear it down."""
        async with self._teardown_lock(vm_id):
            vm = await self.reload(vm_id)
            if vm.status in ENDED_STATUSES:
                return
            if not await self.set_status(vm_id, vm.status, S.FAILED, failure_reason=reason):
                return
            await self.node.stop(vm_id)
            await self._mounts_gone(vm_id)

    async def finish_terminate(self, vm_id: str, snapshot_id: str | None = None) -> Vm:
        """Tear down a VM already ``terminating`` and record it ``terminated``."""
        await self.node.stop(vm_id)
        await self._mounts_gone(vm_id)
        await self.set_status(
            vm_id, S.TERMINATING, S.TERMINATED, terminated_at=_now(), terminate_snapshot_id=snapshot_id
        )
        return await self.reload(vm_id)

    # -- background work (one pass each; the loops call them, tests may too) -------

    async def reap_expired(self) -> None:
        async with self.db.transaction() as session:
            expired = await VmRepository(session).expired_any_owner(LIVE_STATUSES, _now())
        for vm_id in expired:
            log.info("vm %s reached the end of its lifetime", vm_id)
            await self._terminate(vm_id)

    async def check_machines(self) -> None:
        """Fail running VMs whose process is gone, or whose agent broke the
        protocol's limits (a flooding or garbage-sending guest)."""
        await self.node.cap_consoles()
        transient = self.node.transient
        for vm_id, machine in self.node.machines.items():
            if vm_id in transient or vm_id in self._boot_tasks:
                continue  # the node's own VMs are its business; a booting VM's task notices
            if machine.agent.misbehaving is not None:
                log.warning("vm %s: %s", vm_id, machine.agent.misbehaving)
                await self.fail(vm_id, machine.agent.misbehaving)
                continue
            if self.node.hypervisor.is_running(machine):
                continue
            if self.node.machines.saving(vm_id):
                continue  # a save (suspend, snapshot on terminate) stops it on purpose
            log.warning("vm %s: its QEMU process exited", vm_id)
            reason = "qemu process exited"
            console = await self.node.console_tail(vm_id, self.run_dir(vm_id), FAILURE_CONSOLE_BYTES)
            if console.strip():
                reason += f"\n--- console (last {FAILURE_CONSOLE_BYTES} bytes) ---\n{console}"
            await self.fail(vm_id, reason)

    async def reconcile(self) -> None:
        """One reconciler pass: remove what no live VM owns; fail running VMs
        that lost a resource they had."""

        async def vms_in(statuses: Collection[str]) -> set[str]:
            async with self.db.transaction() as session:
                return {vm.id for vm in await VmRepository(session).list_any_owner(statuses)}

        async def live_vms() -> set[str]:
            return await vms_in(RESOURCE_HOLDING_STATUSES)

        async def suspended_vms() -> set[str]:
            return await vms_in({S.SUSPENDED})

        result = await self.node.reconcile(live_vms, suspended_vms)
        for vm_id, reason in result.broken.items():
            if vm_id in self._boot_tasks or vm_id in self.node.transient or self.node.machines.saving(vm_id):
                continue  # being made or saved, or the node's own: its resources come and go on purpose
            vm = await self.reload(vm_id)
            if vm.status == S.RUNNING:
                log.warning("vm %s: %s", vm_id, reason)
                await self.fail(vm_id, reason)

    # -- internals -----------------------------------------------------------------

    def _check_egress(self, policy: dict[str, Any] | None) -> None:
        """422 on ``egress_policy`` for a policy that cannot be enforced (a bad name or CIDR)."""
        if policy is None:
            return
        try:
            check_rules(self.egress.rules(policy))
        except EgressRefused as error:
            raise InvalidRequest.single(("egress_policy",), str(error)) from error

    async def _admit(
        self,
        owner_id: int,
        plan: CreatePlan,
        vault_ids: Sequence[str],
        *,
        vm_id: str | None = None,
        snapshot_id: str | None = None,
        disk_snapshot_id: str | None = None,
        mounts: MountPlan | None = None,
    ) -> Vm:
        """Check the host's limits and the user's quota and insert the VM
        (status creating) with its mounts, atomically."""
        async with self.admission.lock, self.db.transaction() as session:
            await self.admission.check(session, owner_id, plan.memory_mb, plan.vcpu_count)
            session_id = plan.session_id or str(uuid.uuid4())
            await SessionRepository(session).get_or_add(owner_id, session_id)
            vms = VmRepository(session)
            if await vms.for_session(owner_id, session_id, LIVE_STATUSES) is not None:
                raise Conflict(f"session {session_id} already has a live VM")
            now = _now()
            vm = await vms.add(
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
                    network_error=network_error(plan.egress_policy, self.node),
                    vault_ids=list(vault_ids),
                    snapshot_on_terminate=plan.snapshot_on_terminate,
                    snapshot_name=plan.snapshot_name,
                    snapshot_id=snapshot_id,
                    disk_snapshot_id=disk_snapshot_id,
                    auto_suspend=plan.auto_suspend,
                    auto_resume=plan.auto_resume,
                    created_at=now,
                    updated_at=now,
                    expires_at=now + plan.lifetime,
                )
            )
            for hook in self.admit_hooks:
                await hook(session, vm, plan)
            await record(session, created_event(vm, from_pool=vm_id is not None))
            if vm_id is not None:
                # A claimed pool VM: its host resources are this user's now.
                await HostResourceRepository(session).set_owner_any_owner(vm_id, owner_id)
            if mounts is not None and self.mounts is not None:
                await self.mounts.record(session, owner_id, vm.id, mounts)
            await session.refresh(vm, ["mounts"])
            return vm

    def _start_boot(
        self,
        vm: VmContext,
        env: dict[str, str],
        current: VmStatus = S.CREATING,
        claimed: Machine | None = None,
    ) -> None:
        task = asyncio.create_task(self._boot(vm, env, current, claimed), name=f"boot:{vm.vm_id}")
        self._boot_tasks[vm.vm_id] = task
        task.add_done_callback(lambda _: self._boot_tasks.pop(vm.vm_id, None))

    async def _boot(
        self, vm: VmContext, env: dict[str, str], current: VmStatus, claimed: Machine | None
    ) -> None:
        """Bring the VM up (or take ``claimed``, a warm pool VM already running)
        and make it running; ``current`` is creating, or resuming for a
        suspended VM (whose env is already in its memory)."""
        vm_id = vm.vm_id
        try:
            if claimed is not None:
                drift_ns = await self.node.claim(vm, claimed)
                log.debug("vm %s claimed from the pool; its clock was off by %.1f ms", vm_id, drift_ns / 1e6)
                machine = claimed
            else:
                machine = await self.node.start(vm)
            env_status, env_error = "none", None
            if env:
                try:
                    await machine.agent.call("set_env", env=env)
                    env_status = "applied"
                except AgentError as error:
                    env_status, env_error = "failed", describe(error)
            env_fields = {"env_status": env_status, "env_error": env_error} if current == S.CREATING else {}
            # False when a DELETE or the reaper moved the VM on meanwhile; they tear it down.
            self.activity.touch(vm_id)
            if await self.set_status(vm_id, current, S.RUNNING, **env_fields) and self.mounts is not None:
                await self.mounts.vm_running(vm_id)
        except asyncio.CancelledError:
            raise  # whoever cancelled the boot (terminate, stop) cleans up
        except Exception as error:
            log.warning("vm %s failed to start: %s", vm_id, describe(error))
            if current == S.RESUMING:
                # The saved state is untouched: the VM stays suspended, and may be resumed again.
                await self.node.stop(vm_id, suspending=True)
                reason = f"resuming failed: {describe(error)}"
                await self.set_status(vm_id, S.RESUMING, S.SUSPENDED, failure_reason=reason)
            else:
                await self.fail(vm_id, describe(error))
        finally:
            if claimed is not None and self.pool is not None:
                # Handed out (or failed): only now may a restore take the CPU.
                self.pool.refill()

    async def _wait_running(self, vm_id: str) -> Vm:
        task = self._boot_tasks.get(vm_id)
        if task is not None:
            # Shielded: a client that hangs up must not cancel the boot half-way.
            await asyncio.shield(task)
        vm = await self.reload(vm_id)
        if vm.status != S.RUNNING:
            raise VmStartFailed(vm.id, vm.failure_reason or f"the VM is {vm.status}")
        return vm

    async def _terminate(self, vm_id: str) -> Vm:
        async with self._teardown_lock(vm_id):
            # Retried because the boot task may move the VM on between read and write.
            while True:
                vm = await self.reload(vm_id)
                if vm.status == S.TERMINATED:
                    return vm
                if vm.status == S.TERMINATING:
                    break
                if not can_transition(vm.status, S.TERMINATING):
                    raise Conflict(f"vm {vm_id} is {vm.status} and cannot be terminated now")
                if await self.set_status(vm_id, vm.status, S.TERMINATING):
                    break
            await self._stop_boot(vm_id)
            snapshot_id = await self._snapshot_before_terminate(vm)
            return await self.finish_terminate(vm_id, snapshot_id)

    async def _snapshot_before_terminate(self, vm: Vm) -> str | None:
        """``snapshot_on_terminate``: save a running VM (type auto) before it goes;
        a suspended VM's saved state becomes that snapshot. A failed save does not
        stop the termination (the snapshot is recorded as failed)."""
        # ``vm`` is the record as it was before it moved to terminating.
        if not vm.snapshot_on_terminate:
            return None
        try:
            if vm.status == S.SUSPENDED and vm.disk_snapshot_id is not None:
                snapshot = await self.snapshots.adopt_suspend_state(vm.disk_snapshot_id, vm.snapshot_name)
            elif vm.status == S.RUNNING and self.node.machine(vm.id) is not None:
                snapshot = await self.snapshots.save_before_teardown(vm, SnapshotType.AUTO, vm.snapshot_name)
            else:
                return None
        except Exception as error:
            log.warning("vm %s: the snapshot before terminating failed: %s", vm.id, error)
            return None
        log.info("vm %s saved as snapshot %s before terminating", vm.id, snapshot.id)
        return snapshot.id

    async def _stop_boot(self, vm_id: str) -> None:
        task = self._boot_tasks.get(vm_id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _mounts_gone(self, vm_id: str) -> None:
        if self.mounts is not None:
            await self.mounts.vm_ended(vm_id)

    def _teardown_lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._teardown_locks.get(vm_id)
        if lock is None:
            lock = asyncio.Lock()
            self._teardown_locks[vm_id] = lock
        return lock

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
