"""After a (re)start: settle every VM an earlier server left mid-way.

A ``kill -9`` of the server may come at any step; QEMU runs in its own session
and outlives it. For each VM the store says holds resources:

- ``running``: adopt its process. A save that was in progress (a snapshot, a
  clone) is finished or undone (``SnapshotService.settle_interrupted_save``),
  and the guest runs again; if the process is gone, the VM fails.
- ``suspending``: the save into its suspend state is finished (the VM is
  ``suspended``) or undone (the VM is ``running`` again, as it was).
- ``resuming``: whatever the resume started goes; the VM is ``suspended``
  again, its saved state untouched (the user may resume again).
- ``terminating``: a snapshot on terminate in progress is finished or
  recorded failed, and the VM is torn down.
- ``creating``: its env values were never stored, so it cannot be finished:
  it fails and is torn down.

Then the reconciler removes whatever no live VM owns (pool VMs, builds and
imports of the old server, leftovers of any crash).
"""

from __future__ import annotations

import logging

from kiln.runtime.driver import SaveOutcome
from kiln.services.states import RESOURCE_HOLDING_STATUSES, VmStatus
from kiln.services.vms import VmService
from kiln.store.db import Database
from kiln.store.models import Vm
from kiln.store.repositories import VmRepository

log = logging.getLogger(__name__)

S = VmStatus


async def recover(vms: VmService, db: Database) -> None:
    async with db.transaction() as session:
        unsettled = await VmRepository(session).list_any_owner(RESOURCE_HOLDING_STATUSES)
    for vm in unsettled:
        try:
            await _settle(vms, vm)
        except Exception as error:
            log.exception("vm %s: settling it after the restart failed", vm.id)
            await vms.fail(vm.id, f"the server restarted while the VM was {vm.status}, and: {error}")
    await vms.reconcile()


async def _settle(vms: VmService, vm: Vm) -> None:
    node = vms.node
    if vm.status == S.CREATING:
        await vms.fail(vm.id, "the server restarted while the VM was being created")
        return
    if vm.status == S.RESUMING:
        await node.stop(vm.id, suspending=True)
        await vms.set_status(vm.id, S.RESUMING, S.SUSPENDED, failure_reason="the server restarted during the resume")
        log.info("vm %s: the resume a restart cut short was undone; it is suspended", vm.id)
        return
    machine = await node.adopt(vm.id, vms.run_dir(vm.id), vm.owner_id)
    outcome, snapshot_id = await vms.snapshots.settle_interrupted_save(vm)
    if vm.status == S.RUNNING:
        if machine is None or not node.is_running(vm.id):
            await vms.fail(vm.id, "not running after server restart")
        else:
            log.info("vm %s adopted", vm.id)
        return
    if vm.status == S.SUSPENDING:
        if node.is_running(vm.id):
            # A stopping save stops QEMU only once the state is whole: undone.
            await vms.set_status(vm.id, S.SUSPENDING, S.RUNNING)
            log.info("vm %s: the suspend a restart cut short was undone; it runs", vm.id)
        elif outcome == SaveOutcome.COMPLETED or (outcome is None and await vms.snapshots.is_suspend_state_of(vm)):
            # Finished (and maybe recorded) just before the stop.
            await node.stop(vm.id, suspending=True)
            await vms.set_status(vm.id, S.SUSPENDING, S.SUSPENDED)
            log.info("vm %s: the suspend a restart cut short was finished", vm.id)
        else:
            await vms.fail(vm.id, "the server restarted while the VM was being suspended, and its process is gone")
        return
    # terminating: the snapshot on terminate, if one was being taken, is kept when whole.
    await vms.finish_terminate(vm.id, snapshot_id if outcome == SaveOutcome.COMPLETED else None)
