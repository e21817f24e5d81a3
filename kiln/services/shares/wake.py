"""Wake on request, and its other half: suspending idle VMs (``auto_suspend``).

- ``IdleSuspender``: once a second, every running VM with ``auto_suspend``
  that has had no guest call (exec, files, a terminal: an agent call in flight
  counts as use), no share traffic and no start for
  ``KILN_AUTO_SUSPEND_IDLE_SECONDS`` is suspended (``VmService.suspend``).
- ``RouterRequests.handle``: the server's side of the share router's control
  socket. ``wake`` resumes a suspended VM with ``auto_resume`` and answers once
  it runs (the router holds the request meanwhile; it never touches QEMU);
  ``activity`` is the router's report of VMs that had traffic or open
  connections since its last one.
"""

from __future__ import annotations

import logging

from kiln.config import Settings
from kiln.services.background import Periodic
from kiln.services.errors import ServiceError
from kiln.services.states import VmStatus
from kiln.services.vms import VmService, describe
from kiln.store.repositories import VmRepository

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
WAKE_STATUSES = frozenset({VmStatus.SUSPENDED, VmStatus.RESUMING, VmStatus.RUNNING})


class IdleSuspender:
    def __init__(self, settings: Settings, vms: VmService) -> None:
        self._idle_seconds = settings.auto_suspend_idle_seconds
        self._vms = vms
        self._passes = Periodic("idle-suspender", self.check, IDLE_CHECK_SECONDS)

    def start(self) -> None:
        self._passes.start()

    async def stop(self) -> None:
        await self._passes.stop()

    async def check(self) -> list[str]:
        """One pass: suspend the idle VMs; returns their ids."""
        async with self._vms.db.transaction() as session:
            running = await VmRepository(session).list_any_owner([VmStatus.RUNNING])
        suspended = []
        for vm in running:
            if not vm.auto_suspend or self._vms.booting(vm.id):
                continue
            machine = self._vms.node.machine(vm.id)
            if machine is not None and machine.agent.in_flight:
                self._vms.activity.touch(vm.id)  # a long exec or an attached terminal
                continue
            if self._vms.activity.idle_seconds(vm.id) < self._idle_seconds:
                continue
            log.info("vm %s idle for %ss: suspending it (auto_suspend)", vm.id, self._idle_seconds)
            try:
                await self._vms.suspend(vm.owner_id, vm.id)
            except ServiceError as error:
                log.warning("vm %s: auto-suspend failed: %s", vm.id, error)
                continue
            self._vms.activity.forget(vm.id)
            suspended.append(vm.id)
        return suspended


class RouterRequests:
    """What the share router may ask of the server (JSON objects in, JSON objects out)."""

    def __init__(self, vms: VmService) -> None:
        self._vms = vms

    async def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "activity":
            vm_ids = [vm_id for vm_id in request.get("vm_ids", []) if isinstance(vm_id, str)]
            self._vms.activity.touch(*vm_ids)
            return {"ok": True}
        if op == "wake":
            return await self._wake(str(request.get("vm_id", "")))
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def _wake(self, vm_id: str) -> dict:
        """Resume a VM that allows it (``auto_resume``) and wait until it runs."""
        try:
            vm = await self._vms.reload(vm_id)
            if not vm.auto_resume or vm.status not in WAKE_STATUSES:
                return {"ok": False, "error": f"vm {vm_id} is {vm.status} and does not resume on request"}
            self._vms.activity.touch(vm_id)
            if vm.status != VmStatus.RUNNING:
                vm = await self._vms.resume(vm.owner_id, vm_id, wait=True)
        except ServiceError as error:
            return {"ok": False, "error": describe(error)}
        return {"ok": vm.status == VmStatus.RUNNING, "status": vm.status}
