"""The lifecycle pipeline with a fake participant: records before it makes,
releases on a failed start, and the reconciler's three cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from unit.fakes import FakeHypervisor, FakeImageStore

from kiln.node.ledger import MemoryLedger
from kiln.node.participant import HostResource, Launch, Ledger, VmContext
from kiln.node.pipeline import Pipeline
from kiln.runtime.driver import Machine
from kiln.runtime.errors import BootError


class Things:
    """A participant whose host resources are names in a set."""

    name = "things"
    kinds = frozenset({"thing"})
    kept_while_suspended = False

    def __init__(self) -> None:
        self.on_host: set[str] = set()
        self.order: list[str] = []

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        resource = HostResource("thing", f"thing-{vm.vm_id}", vm.vm_id)
        await ledger.record(resource)
        self.order.append("recorded" if resource.name not in self.on_host else "made before recorded")
        self.on_host.add(resource.name)

    async def ready(self, vm: VmContext, machine: Machine, *, restored: bool) -> None:
        pass

    async def claimed(self, vm: VmContext, machine: Machine) -> None:
        pass

    async def release(self, vm_id: str, resources: list[HostResource], ledger: Ledger) -> None:
        for resource in resources:
            self.on_host.discard(resource.name)
            await ledger.forget(resource)

    async def inventory(self) -> list[HostResource]:
        return [HostResource("thing", name, name.removeprefix("thing-")) for name in self.on_host]


def context(tmp_path: Path, vm_id: str) -> VmContext:
    image = FakeImageStore(tmp_path).get("default")
    assert image is not None
    return VmContext(vm_id, 1, 1, 256, image, tmp_path / "vms" / vm_id)


@pytest.fixture
def parts() -> tuple[Things, MemoryLedger, FakeHypervisor]:
    return Things(), MemoryLedger(), FakeHypervisor()


async def test_a_failed_start_releases_what_was_recorded(tmp_path: Path, parts) -> None:  # type: ignore[no-untyped-def]
    things, ledger, hypervisor = parts
    hypervisor.start_error = BootError("no")
    pipeline = Pipeline(hypervisor, [things], ledger, boot_timeout=5)
    with pytest.raises(BootError):
        await pipeline.bring_up(context(tmp_path, "vm-a"))
    assert things.order == ["recorded"]
    assert things.on_host == set() and ledger.rows == {}


async def test_the_reconciler_removes_strays_forgets_the_dead_and_reports_the_broken(
    tmp_path: Path, parts  # type: ignore[no-untyped-def]
) -> None:
    things, ledger, hypervisor = parts
    pipeline = Pipeline(hypervisor, [things], ledger, boot_timeout=5)
    for vm_id in ("vm-live", "vm-broken", "vm-dead"):
        await pipeline.bring_up(context(tmp_path, vm_id))
    things.on_host.add("thing-vm-nobody")  # made by a crashed server, never recorded
    things.on_host.discard("thing-vm-broken")  # vanished behind Kiln's back

    async def live() -> set[str]:
        return {"vm-live", "vm-broken"}

    result = await pipeline.reconcile(live)

    assert things.on_host == {"thing-vm-live"}
    assert {row.vm_id for row in ledger.rows.values()} == {"vm-live", "vm-broken"}
    assert set(result.broken) == {"vm-broken"}
    removed = {(item.kind, item.name) for item in result.removed}
    assert removed == {("thing", "thing-vm-nobody"), ("thing", "thing-vm-dead")}


class SavedThings(Things):
    """A participant whose resources a suspended VM's saved state needs (as volumes')."""

    name = "saved-things"
    kinds = frozenset({"saved-thing"})
    kept_while_suspended = True

    async def prepare(self, vm: VmContext, launch: Launch, ledger: Ledger) -> None:
        resource = HostResource("saved-thing", f"saved-{vm.vm_id}", vm.vm_id)
        await ledger.record(resource)
        self.on_host.add(resource.name)

    async def inventory(self) -> list[HostResource]:
        return [HostResource("saved-thing", name, name.removeprefix("saved-")) for name in self.on_host]


async def test_a_suspend_keeps_what_the_saved_state_needs_and_the_reconciler_leaves_it(
    tmp_path: Path, parts  # type: ignore[no-untyped-def]
) -> None:
    things, ledger, hypervisor = parts
    saved = SavedThings()
    pipeline = Pipeline(hypervisor, [things, saved], ledger, boot_timeout=5)
    await pipeline.bring_up(context(tmp_path, "vm-s"))
    await pipeline.release("vm-s", suspending=True)
    assert things.on_host == set() and saved.on_host == {"saved-vm-s"}

    async def nobody_live() -> set[str]:
        return set()

    async def suspended() -> set[str]:
        return {"vm-s"}

    result = await pipeline.reconcile(nobody_live, suspended)
    assert saved.on_host == {"saved-vm-s"} and result.removed == [] and result.broken == {}
    # Once the VM is gone for good (not suspended any more), they are strays.
    await pipeline.reconcile(nobody_live, nobody_live)
    assert saved.on_host == set() and ledger.rows == {}


async def test_a_failed_resume_keeps_them_too(tmp_path: Path, parts) -> None:  # type: ignore[no-untyped-def]
    things, ledger, hypervisor = parts
    saved = SavedThings()
    pipeline = Pipeline(hypervisor, [things, saved], ledger, boot_timeout=5)
    hypervisor.start_error = BootError("no")
    resuming = dataclasses.replace(context(tmp_path, "vm-r"), resuming=True)
    with pytest.raises(BootError):
        await pipeline.bring_up(resuming)
    assert things.on_host == set() and saved.on_host == {"saved-vm-r"}
