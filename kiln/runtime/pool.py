"""A warm pool: VMs already restored from a base snapshot, idle, ready to be claimed.

Claiming one takes no QEMU start-up at all. Each idle VM got its identity when
the pool filled (``reset_identity``: its own entropy seed, the clock, and as
hostname the ``vm_id`` it keeps when claimed): under TCG the first
``post_restore`` after a restore runs guest code never translated since the
restore and took 290-500 ms, which a claim no longer waits for. A claim only
sets the clock again (``settle_claimed``: the VM may have idled for hours) and the
VM service applies env. The pool keeps ``size`` idle VMs of one saved state (the
default image's base snapshot for the default shape, from ``source``) and
refills in the background once a claimed VM is handed out (``refill``), so a
restore does not compete for the CPU with the claim; when the source changes (a
rebuilt image), idle VMs of the old one are destroyed and replaced.

Idle VMs are not the server's VMs yet: no database rows, not counted by
admission. Across a restart they are not kept: ``stop`` destroys them, and
``start`` destroys any that a crashed server left (their run dirs carry the
marker file ``POOL_MARKER``), because nobody knows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.config import Settings
from kiln.runtime.agent_client import AgentError
from kiln.runtime.driver import BootImage, Hypervisor, Machine, MachineSpec, SavedState
from kiln.runtime.snapshots import reset_identity

log = logging.getLogger(__name__)

# In the run dir of an idle pool VM; removed when it is claimed.
POOL_MARKER = "kiln-pool-idle"
# Re-check the source this often even when nothing was claimed (an image may be rebuilt).
RECHECK_SECONDS = 30.0
RETRY_SECONDS = 5.0

PoolSource = Callable[[], Awaitable[tuple[BootImage, SavedState] | None]]


@dataclass
class IdleVm:
    machine: Machine
    saved: Path  # the saved state's directory it was restored from


class WarmPool:
    def __init__(
        self,
        settings: Settings,
        hypervisor: Hypervisor,
        size: int,
        source: PoolSource,
        new_vm_id: Callable[[], str],
    ) -> None:
        self._settings = settings
        self._hypervisor = hypervisor
        self.size = size
        self._source = source
        self._new_vm_id = new_vm_id
        self._idle: list[IdleVm] = []
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def idle_machines(self) -> list[Machine]:
        """The idle VMs, oldest first (for tests and diagnostics)."""
        return [vm.machine for vm in self._idle]

    async def start(self) -> None:
        await self.remove_orphans()
        if self.size > 0:
            self._filler = asyncio.create_task(self._fill_forever(), name="warm-pool")

    async def stop(self) -> None:
        """Destroy the idle VMs (see the module docstring for why)."""
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
            self._filler = None
        idle, self._idle = self._idle, []
        for vm in idle:
            await self._hypervisor.destroy(vm.machine.vm_id, vm.machine.run_dir)

    def claim(self, saved: SavedState) -> Machine | None:
        """An idle VM restored from ``saved``, now the caller's; None if there is none.

        Its identity is set (hostname: its ``vm_id``); the caller runs
        ``settle_claimed`` on it and calls ``refill`` once it is handed out."""
        for index, vm in enumerate(self._idle):
            if vm.saved == saved.directory and self._hypervisor.is_running(vm.machine):
                del self._idle[index]
                (vm.machine.run_dir / POOL_MARKER).unlink(missing_ok=True)
                return vm.machine
        self.refill()  # nothing to claim: nothing to wait for either
        return None

    def refill(self) -> None:
        """Wake the filler (after a claimed VM was handed out, or failed)."""
        self._wanted.set()

    async def remove_orphans(self) -> None:
        """Destroy idle VMs a previous server left (their run dirs have the marker)."""
        vms_dir = self._settings.vms_dir
        if not vms_dir.is_dir():
            return
        for marker in vms_dir.glob(f"*/{POOL_MARKER}"):
            run_dir = marker.parent
            log.info("destroying idle pool VM %s left by an earlier server", run_dir.name)
            await self._hypervisor.destroy(run_dir.name, run_dir)

    async def fill(self) -> None:
        """One pass: drop idle VMs that died or are of an old source, then restore
        VMs until there are ``size``."""
        source = await self._source()
        if source is None:
            return
        image, saved = source
        for vm in list(self._idle):
            if vm.saved != saved.directory or not self._hypervisor.is_running(vm.machine):
                self._idle.remove(vm)
                await self._hypervisor.destroy(vm.machine.vm_id, vm.machine.run_dir)
        while len(self._idle) < self.size:
            self._idle.append(IdleVm(await self._restore(image, saved), saved.directory))

    async def _restore(self, image: BootImage, saved: SavedState) -> Machine:
        vm_id = self._new_vm_id()
        run_dir = self._settings.vms_dir / vm_id
        started = time.monotonic()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / POOL_MARKER).touch()
        try:
            machine = await self._hypervisor.start(
                MachineSpec(
                    vm_id=vm_id,
                    vcpu_count=saved.vcpu_count,
                    memory_mb=saved.memory_mb,
                    image=image,
                    run_dir=run_dir,
                    restore_from=saved,
                )
            )
            await machine.wait_ready(self._settings.boot_timeout_seconds)
            # Now rather than at the claim: see the module docstring.
            await reset_identity(machine, vm_id)
        except BaseException:
            await self._hypervisor.destroy(vm_id, run_dir)
            raise
        log.debug("pool VM %s ready in %.2fs", vm_id, time.monotonic() - started)
        return machine

    async def _fill_forever(self) -> None:
        while True:
            try:
                await self.fill()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("warm pool: refilling failed: %s", error)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._wanted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), RECHECK_SECONDS)


async def settle_claimed(machine: Machine) -> int:
    """Give a claimed pool VM the host's time; returns how far its clock was off
    (ns, guest minus host). Its identity was set when the pool filled; a guest
    agent without ``set_clock`` (an older image) gets a whole ``post_restore``."""
    host_ns = time.time_ns()
    try:
        value = await machine.agent.call("set_clock", time_ns=host_ns)
    except AgentError as error:
        if error.code != "EUNKNOWNOP":
            raise
        await reset_identity(machine, machine.vm_id)
        return 0
    return int(value.get("previous_ns", host_ns)) - host_ns
