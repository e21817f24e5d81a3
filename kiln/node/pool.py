"""A warm pool: VMs already restored from a base snapshot, idle, ready to be claimed.

Claiming one takes no QEMU start-up at all. Pool VMs come up through the same
pipeline as every VM (``Node.start``, with no owner): their host resources
(process, cgroup, network with a deny-all policy) are made and recorded when
the pool fills, and their identity is set then (the pipeline's restore step:
its own entropy seed, the clock, and as hostname the ``vm_id`` it keeps when
claimed); under TCG the first ``post_restore`` after a restore costs 290-500
ms, which a claim no longer waits for. Then it runs a bash and a python3 once
(``WARM_UP_COMMANDS``): under TCG a restored VM's translated code starts empty,
and the first exec in it pays 300-500 ms to translate bash, ld.so and libc (and
the interpreter) again. Translations are kept by guest physical page, so the
user's own processes, which map the same pages, find them made. A claim
(``Node.claim``) sets the clock again and lets every participant apply what is
the user's own (egress policy, mounts); the VM service applies env.

The pool keeps ``size`` idle VMs of one saved state (the default image's base
snapshot for the default shape, from ``source``) and refills in the background
once a claimed VM is handed out (``refill``), so a restore does not compete for
the CPU with the claim; when the source changes (a rebuilt image), idle VMs of
the old one are destroyed and replaced.

Idle VMs are the node's own (transient) VMs: no rows in the store's VM table,
but counted by admission through ``idle_count``. Across a restart they are not
kept: ``stop`` destroys them, and the reconciler removes any a crashed server
left (their resources are recorded, and no live VM owns them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.node.node import Node
from kiln.node.participant import EgressRules, VmContext
from kiln.runtime.driver import BootImage, Machine, SavedState
from kiln.runtime.errors import RuntimeFailure

log = logging.getLogger(__name__)

# Re-check the source this often even when nothing was claimed (an image may be rebuilt).
RECHECK_SECONDS = 30.0
RETRY_SECONDS = 5.0

PoolSource = Callable[[], Awaitable[tuple[BootImage, SavedState] | None]]

# What each new pool VM runs once (best effort: a VM whose warm-up fails is kept).
WARM_UP_COMMANDS = (("/bin/bash", "-c", "true"), ("python3", "-c", "pass"))
WARM_UP_SECONDS = 30.0


@dataclass
class IdleVm:
    machine: Machine
    saved: Path  # the saved state's directory it was restored from


class WarmPool:
    def __init__(
        self,
        node: Node,
        vms_dir: Path,
        size: int,
        source: PoolSource,
        new_vm_id: Callable[[], str],
        *,
        warm_up: bool = True,
    ) -> None:
        self._node = node
        self._warm_up = warm_up
        self._vms_dir = vms_dir
        self.size = size
        self._source = source
        self._new_vm_id = new_vm_id
        self._idle: list[IdleVm] = []
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    @property
    def idle_count(self) -> int:
        """Idle VMs, ready to be claimed."""
        return len(self._idle)

    @property
    def idle_machines(self) -> list[Machine]:
        """The idle VMs, oldest first (for tests and diagnostics)."""
        return [vm.machine for vm in self._idle]

    async def start(self) -> None:
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
            await self._node.stop(vm.machine.vm_id)

    def claim(self, saved: SavedState) -> Machine | None:
        """An idle VM restored from ``saved``, now the caller's; None if there is none.

        Its identity is set (hostname: its ``vm_id``); the caller runs
        ``Node.claim`` on it and calls ``refill`` once it is handed out."""
        for index, vm in enumerate(self._idle):
            if vm.saved == saved.directory and self._node.is_running(vm.machine.vm_id):
                del self._idle[index]
                return vm.machine
        self.refill()  # nothing to claim: nothing to wait for either
        return None

    def refill(self) -> None:
        """Wake the filler (after a claimed VM was handed out, or failed)."""
        self._wanted.set()

    async def fill(self) -> None:
        """One pass: drop idle VMs that died or are of an old source, then restore
        VMs until there are ``size``."""
        source = await self._source()
        if source is None:
            return
        image, saved = source
        for vm in list(self._idle):
            if vm.saved != saved.directory or not self._node.is_running(vm.machine.vm_id):
                self._idle.remove(vm)
                await self._node.stop(vm.machine.vm_id)
        while len(self._idle) < self.size:
            self._idle.append(IdleVm(await self._restore(image, saved), saved.directory))

    async def _restore(self, image: BootImage, saved: SavedState) -> Machine:
        vm_id = self._new_vm_id()
        started = time.monotonic()
        machine = await self._node.start(
            VmContext(
                vm_id=vm_id,
                owner_id=None,
                vcpu_count=saved.vcpu_count,
                memory_mb=saved.memory_mb,
                image=image,
                run_dir=self._vms_dir / vm_id,
                restore_from=saved,
                # Wired where the host wires networks (a card cannot be hot-plugged),
                # reaching nothing until the claim applies its user's policy.
                egress=EgressRules() if self._node.wires_networks else None,
            )
        )
        if self._warm_up:
            try:
                await warm_up(machine)
            except BaseException:
                # Not idle yet, so ``stop`` does not know it (a cancelled fill).
                await self._node.stop(vm_id)
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


async def warm_up(machine: Machine) -> None:
    """Run ``WARM_UP_COMMANDS`` in the guest (see the module docstring)."""
    for argv in WARM_UP_COMMANDS:
        try:
            async for _ in machine.agent.stream("exec", timeout=WARM_UP_SECONDS, argv=list(argv), env={}):
                pass
        except RuntimeFailure as error:
            log.warning("pool VM %s: warm-up %s failed: %s", machine.vm_id, argv[0], error)
