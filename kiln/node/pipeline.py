"""The lifecycle pipeline: one sequence for every way a VM comes up or goes away.

Bringing a VM up (a cold boot, a restore from any snapshot, a pool fill, a
resume):

1. every participant ``prepare``s, in order: checks, records its host
   resources in the ledger, creates them, adds what the process needs to the
   ``Launch`` (a TAP fd, drives, a uid and cgroups);
2. the hypervisor starts the process from the VM and the launch; the fds the
   participants opened for it are closed in this process;
3. the guest's agent answers, and the guest gets its own identity (entropy,
   clock, hostname): a restored guest wakes up with its source's;
4. every participant's ``ready`` hook runs (addresses, mounts).

A failure at any step releases everything recorded for the VM, so a failed
start leaves nothing behind (a failed resume keeps what the suspended VM's
saved state needs). Taking a VM down is ``release``: every participant, in
reverse order, removes what the ledger says it made; a suspend leaves the
participants that are ``kept_while_suspended``. ``reconcile`` compares what
the host has with the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from kiln.node.participant import HostResource, Launch, Ledger, Participant, VmContext
from kiln.runtime.driver import Hypervisor, Machine, MachineSpec, Nic
from kiln.runtime.snapshots import reset_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciled:
    """One pass of the reconciler: what it removed, and the live VMs that lack
    a resource they had (the caller fails them with the reason)."""

    removed: list[HostResource]
    broken: dict[str, str]


class Pipeline:
    def __init__(
        self,
        hypervisor: Hypervisor,
        participants: list[Participant],
        ledger: Ledger,
        boot_timeout: float,
    ) -> None:
        self.hypervisor = hypervisor
        self.participants = participants
        self.ledger = ledger
        self._boot_timeout = boot_timeout

    async def bring_up(self, vm: VmContext) -> Machine:
        """Start the VM's process and make it ready (steps 1-4)."""
        launch = Launch()
        try:
            try:
                for participant in self.participants:
                    await participant.prepare(vm, launch, self.ledger)
                machine = await self.hypervisor.start(self._spec(vm, launch))
            finally:
                for fd in launch.owned_fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            await machine.wait_ready(self._boot_timeout)
            restored = vm.restore_from is not None
            # A restored guest must not share randomness, time or name with its siblings.
            await reset_identity(machine, vm.hostname or vm.vm_id)
            for participant in self.participants:
                await participant.ready(vm, machine, restored=restored)
        except BaseException:
            await self.release(vm.vm_id, suspending=vm.resuming)
            raise
        return machine

    async def claim(self, vm: VmContext, machine: Machine) -> None:
        """A pool VM (brought up without an owner) becomes ``vm``: every
        participant applies what is the user's own."""
        for participant in self.participants:
            await participant.claimed(vm, machine)

    async def release(self, vm_id: str, *, suspending: bool = False) -> None:
        """Remove every host resource recorded for the VM (idempotent).
        ``suspending``: the VM is saved and will come back; participants
        whose resources its saved state needs keep them."""
        resources = await self.ledger.of_vm(vm_id)
        for participant in reversed(self.participants):
            if suspending and participant.kept_while_suspended:
                continue
            mine = [resource for resource in resources if resource.kind in participant.kinds]
            try:
                await participant.release(vm_id, mine, self.ledger)
            except Exception as error:
                # The next reconcile pass tries again; the others still release theirs.
                log.warning("vm %s: %s could not release its resources: %s", vm_id, participant.name, error)

    async def reconcile(
        self,
        live: Callable[[], Awaitable[Collection[str]]],
        suspended: Callable[[], Awaitable[Collection[str]]] | None = None,
    ) -> Reconciled:
        """Remove whatever Kiln made that no live VM owns; report live VMs whose
        recorded resources are gone from the host. ``suspended`` VMs own the
        resources of participants that keep theirs while a VM is suspended.

        Per participant, in this order: what the host has, then the ledger,
        then which VMs are live. A resource is recorded before it is made and a
        VM is live (in the store, or a transient VM of the node) before its
        resources are recorded, so nothing being made meanwhile looks stray."""
        removed: list[HostResource] = []
        broken: dict[str, str] = {}
        for participant in self.participants:
            try:
                on_host = await participant.inventory()
            except Exception as error:
                log.warning("reconcile: %s cannot list its resources: %s", participant.name, error)
                continue
            rows = [row for row in await self.ledger.all() if row.kind in participant.kinds]
            alive = set(await live())
            if participant.kept_while_suspended and suspended is not None:
                alive |= set(await suspended())
            present = {(item.kind, item.name) for item in on_host}
            owned = {(row.kind, row.name) for row in rows if row.vm_id in alive}
            stray = [item for item in on_host if (item.kind, item.name) not in owned]
            stray += [row for row in rows if row.vm_id not in alive and (row.kind, row.name) not in present]
            by_vm: dict[str, list[HostResource]] = {}
            for item in stray:
                by_vm.setdefault(item.vm_id, []).append(item)
            for vm_id, items in by_vm.items():
                # Rows of dead VMs whose resource is already gone only need forgetting.
                try:
                    await participant.release(vm_id, items, self.ledger)
                except Exception as error:
                    log.warning("reconcile: %s could not remove %s: %s", participant.name, items, error)
                    continue
                removed += items
            for row in rows:
                if row.vm_id in alive and (row.kind, row.name) not in present:
                    broken.setdefault(row.vm_id, f"its {row.kind} {row.name} is gone from the host")
        for item in removed:
            log.info("reconcile: removed %s %s (vm %s: not live)", item.kind, item.name, item.vm_id or "?")
        return Reconciled(removed, broken)

    async def missing(self, vm_id: str) -> str | None:
        """What the VM lacks now of the resources recorded for it (None:
        nothing): ``reconcile``'s finding, looked at again by a caller that
        holds what stops the VM's resources from changing meanwhile."""
        rows = await self.ledger.of_vm(vm_id)
        for participant in self.participants:
            mine = [row for row in rows if row.kind in participant.kinds]
            if not mine:
                continue
            present = {(item.kind, item.name) for item in await participant.inventory()}
            for row in mine:
                if (row.kind, row.name) not in present:
                    return f"its {row.kind} {row.name} is gone from the host"
        return None

    @staticmethod
    def _spec(vm: VmContext, launch: Launch) -> MachineSpec:
        return MachineSpec(
            vm_id=vm.vm_id,
            vcpu_count=vm.vcpu_count,
            memory_mb=vm.memory_mb,
            image=vm.image,
            run_dir=vm.run_dir,
            restore_from=vm.restore_from,
            memory_in_file=vm.memory_in_file,
            nic=launch.nic or Nic(),
            scsi_drives=tuple(launch.scsi_drives),
            confinement=launch.confinement,
        )
