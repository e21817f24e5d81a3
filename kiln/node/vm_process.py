"""The first participant: the VM's QEMU process, its run dir and its disk overlay.

The process itself is started by the pipeline (``Hypervisor.start``, after every
participant prepared); this participant records it and its run dir before that,
removes both, and finds them on the host: run dirs under the VMs directory and
QEMU processes whose run dir is there (also when the run dir is gone)."""

from __future__ import annotations

from pathlib import Path

from kiln.node.participant import HostResource, Launch, Ledger, VmContext
from kiln.runtime.driver import Hypervisor, Machine

RUN_DIR = "run-dir"
PROCESS = "qemu"


class VmProcess:
    name = "process"
    kinds = frozenset({RUN_DIR, PROCESS})
    kept_while_suspended = False

    def __init__(self, hypervisor: Hypervisor, vms_dir: Path) -> None:
        self._hypervisor = hypervisor
        self._vms_dir = vms_dir

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        run_dir = str(vm.run_dir.resolve())
        await ledger.record(
            HostResource(RUN_DIR, run_dir, vm.vm_id, vm.owner_id),
            HostResource(PROCESS, run_dir, vm.vm_id, vm.owner_id),
        )

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        pass

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        pass

    async def release(self, vm_id: str, resources: list[HostResource], ledger: Ledger) -> None:
        # Both kinds name the run dir; destroy stops the process and removes the dir.
        for run_dir in sorted({resource.name for resource in resources}):
            await self._hypervisor.destroy(vm_id, Path(run_dir))
        await ledger.forget(*resources)

    async def inventory(self) -> list[HostResource]:
        found = []
        if self._vms_dir.is_dir():
            for run_dir in self._vms_dir.resolve().iterdir():
                if run_dir.is_dir():
                    found.append(HostResource(RUN_DIR, str(run_dir), run_dir.name))
        for run_dir in self._hypervisor.running_under(self._vms_dir).values():
            found.append(HostResource(PROCESS, str(run_dir), run_dir.name))
        return found
