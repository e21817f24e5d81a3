"""Starting the node's own VMs (base-snapshot builds, image imports) through
the pipeline, so that they are confined, recorded and reconciled like users' VMs."""

from __future__ import annotations

from pathlib import Path

from kiln.node.node import Node
from kiln.node.participant import VmContext
from kiln.runtime.driver import Machine, MachineSpec


class PipelineLauncher:
    """``kiln.runtime.snapshots.Launcher`` over the node: no owner, no network."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def start(self, spec: MachineSpec) -> Machine:
        return await self._node.start(
            VmContext(
                vm_id=spec.vm_id,
                owner_id=None,
                vcpu_count=spec.vcpu_count,
                memory_mb=spec.memory_mb,
                image=spec.image,
                run_dir=spec.run_dir,
                restore_from=spec.restore_from,
                memory_in_file=spec.memory_in_file,
            )
        )

    async def stop(self, vm_id: str, run_dir: Path) -> None:
        await self._node.stop(vm_id)


class HelperLauncher(PipelineLauncher):
    """How ``kiln.volumes.HelperVms`` starts its helper VMs on a server:
    through the pipeline, as the node's own VMs (transient: live for the
    reconciler while they run, removed by it if a dead server left one)."""

    async def destroy(self, vm_id: str, run_dir: Path) -> None:
        await self.stop(vm_id, run_dir)

    def is_running(self, machine: Machine) -> bool:
        return self._node.is_running(machine.vm_id)
