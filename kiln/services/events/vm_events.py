"""The events of the VM state machine: one per status a VM enters."""

from __future__ import annotations

from kiln.services.events.record import NewEvent, vm_event
from kiln.services.states import VmStatus as S
from kiln.store.models import Vm


def transition_event(vm: Vm, current: str, target: str, reason: str | None) -> NewEvent:
    payload = {"from": current, "to": target, "vcpu_count": vm.vcpu_count, "memory_mb": vm.memory_mb}
    if target == S.FAILED:
        return vm_event(vm, "vm.failed", status="failure", payload=payload, error_message=reason)
    if current == S.RESUMING and target == S.SUSPENDED:
        # A resume that failed leaves the saved state as it was: the VM is suspended again.
        return vm_event(vm, "vm.resume_failed", status="failure", payload=payload, error_message=reason)
    if current == S.SUSPENDING and target == S.RUNNING:
        payload["suspend_failed"] = True
    return vm_event(vm, f"vm.{target}", payload=payload)


def created_event(vm: Vm, *, from_pool: bool) -> NewEvent:
    payload = {
        "vcpu_count": vm.vcpu_count,
        "memory_mb": vm.memory_mb,
        "image_variant": vm.image_variant,
        "snapshot_id": vm.snapshot_id,
        "from_pool": from_pool,
    }
    return vm_event(vm, "vm.created", payload=payload, actor_type="user", actor_id=str(vm.owner_id))
