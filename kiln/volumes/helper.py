"""Short-lived helper VMs that do host-side file work on unmounted volumes.

The host never mounts a user's filesystem image in its own kernel (a crafted
ext4 image is an attack on the kernel's filesystem code). When the files API
needs a volume no VM has mounted, a helper VM is restored from the base
snapshot (a fraction of a second), the volume is hot-attached and mounted in
it, the guest does the work (``kiln.volumes.files``), and the VM is destroyed.
A hostile image then meets a guest kernel inside a VM, the boundary every
user's code already lives behind.

Helper VMs are named ``volh-<hex>``; their run dirs are the leftovers
``inventory`` reports if this process dies while one runs.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.config import Settings
from kiln.runtime.driver import (
    BootImage,
    Confinement,
    Hypervisor,
    MachineSpec,
    SavedState,
)

log = logging.getLogger(__name__)

HELPER_PREFIX = "volh-"
READY_SECONDS = 30.0


@dataclass(frozen=True)
class HelperBase:
    """What a helper VM is restored from."""

    image: BootImage
    saved: SavedState


BaseProvider = Callable[[], Awaitable[HelperBase]]


def is_helper(vm_id: str) -> bool:
    return vm_id.startswith(HELPER_PREFIX)


class HelperVms:
    def __init__(
        self,
        settings: Settings,
        hypervisor: Hypervisor,
        base: BaseProvider,
        confinement: Callable[[str], Confinement | None] | None = None,
    ) -> None:
        self._settings = settings
        self._hypervisor = hypervisor
        self._base = base
        self._confinement = confinement
        # Helpers in a session now: not leftovers, whatever the reconciler sees.
        self.active: set[str] = set()

    def run_dir(self, vm_id: str) -> Path:
        return self._settings.vms_dir / vm_id

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[object]:
        """A ready helper VM (a ``QemuMachine`` with the QEMU driver), destroyed
        at the end whatever happens."""
        base = await self._base()
        vm_id = f"{HELPER_PREFIX}{secrets.token_hex(6)}"
        run_dir = self.run_dir(vm_id)
        self.active.add(vm_id)
        try:
            machine = await self._hypervisor.start(
                MachineSpec(
                    vm_id=vm_id,
                    vcpu_count=base.saved.vcpu_count,
                    memory_mb=base.saved.memory_mb,
                    image=base.image,
                    run_dir=run_dir,
                    restore_from=base.saved,
                    confinement=self._confinement(vm_id) if self._confinement else None,
                )
            )
            await machine.wait_ready(READY_SECONDS)
            yield machine
        finally:
            await self._hypervisor.destroy(vm_id, run_dir)
            self.active.discard(vm_id)

    def leftovers(self) -> list[tuple[str, Path]]:
        """Run dirs of helper VMs (none should outlive its session)."""
        if not self._settings.vms_dir.is_dir():
            return []
        return [
            (path.name, path)
            for path in self._settings.vms_dir.glob(f"{HELPER_PREFIX}*")
        ]

    async def destroy(self, vm_id: str) -> None:
        await self._hypervisor.destroy(vm_id, self.run_dir(vm_id))
