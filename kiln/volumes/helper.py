"""Short-lived helper VMs that do host-side file work on unmounted volumes.

The host never mounts a user's filesystem image in its own kernel (a crafted
ext4 image is an attack on the kernel's filesystem code). When the files API
needs a volume no VM has mounted, a helper VM is restored from the base
snapshot (a fraction of a second), the volume is hot-attached and mounted in
it, the guest does the work (``kiln.volumes.files``), and the volume is
detached again. The helper then waits ``linger_seconds`` for the next such
request (one that finds it skips the restore and the guest tool's loading),
and is destroyed after. A hostile image meets a guest kernel inside a VM, the
boundary every user's code already lives behind; a helper holds no volume
between sessions and nothing of one user's volume reaches the next (each
session mounts, unmounts and detaches its own).

Helper VMs are named ``volh-<hex>``. On a server they start through the
node's pipeline (``kiln.node.launcher.HelperLauncher``): they are the node's
own VMs (no owner, no network), recorded and reconciled like every VM, so a
helper a dead server left is removed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiln.config import Settings
from kiln.runtime.driver import BootImage, Confinement, Machine, MachineSpec, SavedState

log = logging.getLogger(__name__)

HELPER_PREFIX = "volh-"
READY_SECONDS = 30.0
DEFAULT_LINGER_SECONDS = 15.0


@dataclass(frozen=True)
class HelperBase:
    """What a helper VM is restored from."""

    image: BootImage
    saved: SavedState


BaseProvider = Callable[[], Awaitable[HelperBase]]


class HelperHypervisor(Protocol):
    """What helpers need to start and stop VMs: ``kiln.node.launcher.HelperLauncher``
    on a server; a bare ``QemuHypervisor`` in tests (its methods take its own
    machine type, hence the ``Any``)."""

    async def start(self, spec: MachineSpec) -> Machine: ...

    async def destroy(self, vm_id: str, run_dir: Path) -> None: ...

    def is_running(self, machine: Any) -> bool: ...


def is_helper(vm_id: str) -> bool:
    return vm_id.startswith(HELPER_PREFIX)


@dataclass
class HelperSession:
    machine: Machine
    # Set by the user of the session once it left the VM as it found it (no
    # drive attached): only then may the VM serve another session.
    reusable: bool = False


@dataclass
class _Idle:
    machine: Machine
    expiry: asyncio.Task[None] = field(repr=False)


class HelperVms:
    def __init__(
        self,
        settings: Settings,
        hypervisor: HelperHypervisor,
        base: BaseProvider,
        *,
        confinement: Callable[[str], Confinement | None] | None = None,
        linger_seconds: float = DEFAULT_LINGER_SECONDS,
    ) -> None:
        self._settings = settings
        self._hypervisor = hypervisor
        self._base = base
        self._confinement = confinement
        self._linger = linger_seconds
        self._idle: _Idle | None = None
        # Helpers in a session or waiting for one: not leftovers.
        self.active: set[str] = set()

    def run_dir(self, vm_id: str) -> Path:
        return self._settings.vms_dir / vm_id

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[HelperSession]:
        """A ready helper VM (a ``QemuMachine`` with the QEMU driver); kept
        for the next session if the user marked it reusable, else destroyed."""
        machine = self._take_idle() or await self._start()
        session = HelperSession(machine)
        try:
            yield session
        finally:
            if (
                session.reusable
                and self._linger > 0
                and self._idle is None
                and self._hypervisor.is_running(machine)
            ):
                self._park(machine)
            else:
                await self.destroy(machine.vm_id)

    async def _start(self) -> Machine:
        base = await self._base()
        vm_id = f"{HELPER_PREFIX}{secrets.token_hex(6)}"
        self.active.add(vm_id)
        try:
            machine = await self._hypervisor.start(
                MachineSpec(
                    vm_id=vm_id,
                    vcpu_count=base.saved.vcpu_count,
                    memory_mb=base.saved.memory_mb,
                    image=base.image,
                    run_dir=self.run_dir(vm_id),
                    restore_from=base.saved,
                    confinement=self._confinement(vm_id) if self._confinement else None,
                )
            )
            await machine.wait_ready(READY_SECONDS)
        except BaseException:
            await self.destroy(vm_id)
            raise
        return machine

    def _take_idle(self) -> Machine | None:
        idle, self._idle = self._idle, None
        if idle is None:
            return None
        idle.expiry.cancel()
        if not self._hypervisor.is_running(idle.machine):
            self.active.discard(idle.machine.vm_id)
            return None
        return idle.machine

    def _park(self, machine: Machine) -> None:
        async def expire() -> None:
            await asyncio.sleep(self._linger)
            if self._idle is not None and self._idle.machine is machine:
                self._idle = None
                await self.destroy(machine.vm_id)

        self._idle = _Idle(
            machine,
            asyncio.create_task(expire(), name=f"helper-expiry:{machine.vm_id}"),
        )

    async def close(self) -> None:
        """Destroy the idle helper (at shutdown)."""
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.expiry.cancel()
            await self.destroy(idle.machine.vm_id)

    async def destroy(self, vm_id: str) -> None:
        try:
            await self._hypervisor.destroy(vm_id, self.run_dir(vm_id))
        finally:
            self.active.discard(vm_id)
