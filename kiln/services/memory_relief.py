"""``MemoryReliever``: below ``KILN_MEMORY_RECLAIM_FLOOR_MB`` of available
memory (``memory_pressure``), suspend the running VM idle the longest, one per
pass, until the host is above the floor again. Its RAM goes to its saved state
on disk and its QEMU exits; it resumes on the next call that needs it, as any
suspended VM. A VM that cannot be suspended (e.g. a writable checkpoint mount)
is passed over for the next idlest."""

from __future__ import annotations

import logging
from collections.abc import Callable

from kiln.config import Settings
from kiln.services.background import Periodic
from kiln.services.errors import ServiceError
from kiln.services.memory_pressure import available_mb
from kiln.services.states import VmStatus
from kiln.services.vms import VmService
from kiln.store.repositories import VmRepository

log = logging.getLogger(__name__)

RELIEF_CHECK_SECONDS = 2.0


class MemoryReliever:

    """The running side: suspends the idlest VMs while the host is below the
    reclaim floor."""

    def __init__(self, settings: Settings, vms: VmService, available: Callable[[], int] = available_mb) -> None:
        self.floor_mb = settings.memory_reclaim_floor_mb
        self._vms = vms
        self._available = available
        self._passes = Periodic("memory-reliever", self.check, RELIEF_CHECK_SECONDS)

    def start(self) -> None:
        self._passes.start()

    async def stop(self) -> None:
        await self._passes.stop()

    async def check(self) -> str | None:
        """One pass: if the host is below the reclaim floor, suspend the running
        VM idle the longest; returns its id (None: nothing to do, or nothing
        could be suspended)."""
        left = self._available()
        if left >= self.floor_mb:
            return None
        async with self._vms.db.transaction() as session:
            running = await VmRepository(session).list_any_owner([VmStatus.RUNNING])
        candidates = [vm for vm in running if not self._vms.booting(vm.id)]
        candidates.sort(key=lambda vm: self._vms.activity.idle_seconds(vm.id), reverse=True)
        for vm in candidates:
            log.warning(
                "host short of memory (%s MB available, reclaim floor %s MB): suspending vm %s, "
                "idle for %.0f s",
                left,
                self.floor_mb,
                vm.id,
                self._vms.activity.idle_seconds(vm.id),
            )
            try:
                await self._vms.suspend(vm.owner_id, vm.id)
            except ServiceError as error:
                log.warning("vm %s could not be suspended to free memory: %s", vm.id, error)
                continue
            self._vms.activity.forget(vm.id)
            return vm.id
        return None
