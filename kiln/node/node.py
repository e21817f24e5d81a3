"""``Node``: the one narrow facade the services use to act on this host.

Services decide (states, owners, limits); the node does: start a VM through
the pipeline, claim a pool VM, save, stop, adopt after a restart, settle a save
a crash cut short, reconcile the host with the ledger. It holds the registry
of machines. Keeping this surface small is what lets the node side later run
as a daemon on many hosts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln.node.confinement import ConfinementParticipant
from kiln.node.machines import MachineRegistry
from kiln.node.network import Networking
from kiln.node.participant import HostResource, Ledger, Participant, VmContext
from kiln.node.pipeline import Pipeline, Reconciled
from kiln.node.vm_process import PROCESS, RUN_DIR
from kiln.node.volumes import NodeVolumes
from kiln.runtime.driver import BootImage, Hypervisor, Machine, SavedState, SaveOutcome, SaveRecovery
from kiln.runtime.errors import AgentError
from kiln.runtime.snapshots import reset_identity

log = logging.getLogger(__name__)


# Why VMs get no network on a node built without networking (/healthz, VM records).
NETWORKING_OFF = "guest networking is turned off (KILN_NETWORKING=off)"

class Node:
    def __init__(
        self,
        hypervisor: Hypervisor,
        participants: list[Participant],
        ledger: Ledger,
        *,
        boot_timeout: float,
        networking: Networking | None = None,
        confinement: ConfinementParticipant | None = None,
        machines: MachineRegistry | None = None,
        volumes: NodeVolumes | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        # None: no guest networking on this node at all (tests, the CLI).
        self.networking = networking
        self.confinement = confinement
        # None: no volumes on this node (the CLI).
        self.volumes = volumes
        self.machines = machines or MachineRegistry()
        self.pipeline = Pipeline(hypervisor, participants, ledger, boot_timeout)
        self.ledger = ledger
        # VMs the node runs for itself (pool, base-snapshot builds, imports):
        # live for the reconciler although the store has no row of them.
        self._transient: dict[str, VmContext] = {}

    async def start_host(self) -> None:
        """At server start: the host's own parts (the VM user and cgroups,
        Kiln's nftables table, the egress daemon)."""
        if self.confinement is not None:
            await self.confinement.start()
        if self.networking is not None:
            await self.networking.start()

    def health(self) -> dict[str, object]:
        """What this host gives VMs, for ``GET /healthz``."""
        networking: dict[str, object] = {"mode": "off", "reason": NETWORKING_OFF}
        if self.networking is not None:
            status = self.networking.status
            networking = {"mode": status.mode, "reason": status.reason or None}
        return {
            "accelerator": self.accel,
            "confinement": self.confinement.status.as_dict() if self.confinement is not None else None,
            "networking": networking,
        }

    @property
    def wires_networks(self) -> bool:
        """True when VMs here get a network (filtered by their policy)."""
        return self.networking is not None and self.networking.available

    @property
    def accel(self) -> str:
        return self.hypervisor.accel

    async def decide_accel(self, image: BootImage) -> str:
        return await self.hypervisor.decide_accel(image)

    @property
    def transient(self) -> frozenset[str]:
        return frozenset(self._transient)

    def transient_usage(self) -> tuple[int, int, int]:
        """What the node's own VMs hold: (VMs, memory MB, vCPUs)."""
        vms = list(self._transient.values())
        return len(vms), sum(vm.memory_mb for vm in vms), sum(vm.vcpu_count for vm in vms)

    # -- bringing VMs up

    async def start(self, vm: VmContext) -> Machine:
        """Bring the VM up through the pipeline (nothing left behind on failure)."""
        if vm.owner_id is None:
            self._transient[vm.vm_id] = vm
        try:
            machine = await self.pipeline.bring_up(vm)
        except BaseException:
            self._transient.pop(vm.vm_id, None)
            raise
        self.machines.add(machine)
        return machine

    async def claim(self, vm: VmContext, machine: Machine) -> int:
        """A pool VM becomes the user's ``vm``: its clock is set again (it may
        have idled for hours; its identity was set when the pool filled) and
        every participant applies what is the user's own. Returns how far its
        clock was off (ns, guest minus host)."""
        self._transient.pop(vm.vm_id, None)
        host_ns = time.time_ns()
        try:
            value = await machine.agent.call("set_clock", time_ns=host_ns)
            drift = int(value.get("previous_ns", host_ns)) - host_ns
        except AgentError as error:
            if error.code != "EUNKNOWNOP":
                raise
            await reset_identity(machine, vm.vm_id)  # an older agent without set_clock
            drift = 0
        await self.pipeline.claim(vm, machine)
        return drift

    async def adopt(self, vm_id: str, run_dir: Path, owner_id: int | None) -> Machine | None:
        """Find a VM an earlier server left running; its process and run dir
        are recorded again (rows made before the ledger existed, or lost)."""
        machine = await self.hypervisor.adopt(vm_id, run_dir)
        if machine is None:
            return None
        name = str(run_dir.resolve())
        await self.ledger.record(
            HostResource(RUN_DIR, name, vm_id, owner_id), HostResource(PROCESS, name, vm_id, owner_id)
        )
        self.machines.add(machine)
        return machine

    # -- taking VMs down

    async def stop(self, vm_id: str, *, suspending: bool = False) -> None:
        """Take the VM down and remove everything recorded for it. Waits for a
        save in progress. Idempotent. ``suspending``: the VM was saved and will
        be resumed; what its saved state needs stays (its volume attachments)."""
        async with self.machines.save_lock(vm_id):
            await self.release(vm_id, suspending=suspending)

    async def release(self, vm_id: str, *, suspending: bool = False) -> None:
        """``stop`` for callers that already hold the VM's save lock."""
        try:
            # The machine stays known while participants release: volumes
            # unmount through the guest before the process goes.
            await self.pipeline.release(vm_id, suspending=suspending)
        finally:
            self.machines.pop(vm_id)
            self._transient.pop(vm_id, None)

    # -- saving

    async def save(self, vm_id: str, directory: Path, *, keep_running: bool) -> SavedState:
        """Save a running VM (the caller holds its save lock). Without
        ``keep_running`` its process is gone afterwards (its other resources
        are the caller's to release)."""
        machine = self.machines.get(vm_id)
        if machine is None:
            raise LookupError(f"vm {vm_id} has no running process here")
        saved = await self.hypervisor.save(machine, directory, keep_running=keep_running)
        if not keep_running:
            self.machines.pop(vm_id)
        return saved

    async def recover_save(
        self, vm_id: str, run_dir: Path, directory: Path, *, keep_running: bool
    ) -> SaveRecovery:
        """Finish or undo a save of the VM into ``directory`` that a crash cut
        short (the VM adopted if its process still runs)."""
        recovery = await self.hypervisor.recover_save(
            self.machines.get(vm_id), run_dir, directory, keep_running=keep_running
        )
        if recovery.outcome in (SaveOutcome.COMPLETED, SaveOutcome.LOST) and not keep_running:
            self.machines.pop(vm_id)
        return recovery

    def saved_state(self, directory: Path) -> SavedState:
        return self.hypervisor.saved_state(directory)

    async def flatten_saved_disk(self, directory: Path) -> None:
        await self.hypervisor.flatten_saved_disk(directory)

    async def rebase_saved_disk(self, directory: Path, backing: Path) -> None:
        await self.hypervisor.rebase_saved_disk(directory, backing)

    async def copy_saved(self, source: Path, target: Path) -> None:
        await self.hypervisor.copy_saved(source, target)

    # -- health

    async def console_tail(self, vm_id: str, run_dir: Path, max_bytes: int) -> str:
        """The last ``max_bytes`` of the VM's console ("" once its run dir is gone)."""
        return await asyncio.to_thread(self.hypervisor.console_tail, run_dir, max_bytes)

    async def grow_root_disk(self, vm_id: str, size_bytes: int) -> None:
        """Grow the running VM's root disk to ``size_bytes`` (its file system is
        the guest's), under its save lock: a save switches the disk's top node."""
        async with self.machines.save_lock(vm_id):
            machine = self.machines.get(vm_id)
            if machine is None:
                raise LookupError(f"vm {vm_id} has no running process here")
            await self.hypervisor.grow_root_disk(machine, size_bytes)

    def reserved_disk_bytes(self) -> int:
        """What the running VMs may still write to the host's disk (blocking)."""
        return sum(self.hypervisor.disk_growth_left(machine) for _, machine in self.machines.items())

    async def cap_consoles(self) -> None:
        """Keep every running VM's console log under its cap (a guest may write without end)."""
        for _, machine in self.machines.items():
            await asyncio.to_thread(self.hypervisor.cap_console, machine.run_dir)

    def machine(self, vm_id: str) -> Machine | None:
        return self.machines.get(vm_id)

    def is_running(self, vm_id: str) -> bool:
        machine = self.machines.get(vm_id)
        return machine is not None and self.hypervisor.is_running(machine)

    async def reconcile(
        self,
        live_user_vms: Callable[[], Awaitable[set[str]]],
        suspended_user_vms: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> Reconciled:
        """One reconciler pass; ``live_user_vms`` reads the store's live VMs,
        ``suspended_user_vms`` its suspended ones (called after the host and
        the ledger were read, see ``Pipeline``)."""

        async def live() -> set[str]:
            return await live_user_vms() | set(self._transient)

        found = await self.pipeline.reconcile(live, suspended_user_vms)
        # A VM reported broken is looked at again under its save lock: a hot
        # attach or detach (or a save) that ran while the pass read the host
        # and the ledger changes both on purpose, and is over by then.
        broken = {}
        for vm_id in found.broken:
            if vm_id in self._transient:
                continue  # the node's own VMs (being built or idle): not the caller's to fail
            async with self.machines.save_lock(vm_id):
                reason = await self.pipeline.missing(vm_id)
            if reason is not None:
                broken[vm_id] = reason
        return Reconciled(found.removed, broken)
