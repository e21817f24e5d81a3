"""Volumes through a VM's life with real VMs: the pipeline participant from
prepare to release, a suspend and resume (save, then a restore with the drives
on the command line), the files API, and a QEMU killed with a volume mounted."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import uuid
from dataclasses import replace

import pytest
from integration.volumes_fixtures import MiB, VolumeKit, kit_fixture, ok, run  # noqa: F401

from kiln.config import Settings
from kiln.node.ledger import MemoryLedger
from kiln.node.participant import Launch, Mount, VmContext
from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.qemu import QemuHypervisor
from kiln.runtime.qemu.process import process_is_alive
from kiln.volumes import (
    PathRefused,
    VolumeFileConflict,
    VolumeFileNotFound,
    VolumeParticipant,
)
from kiln.volumes.hotplug import drives

pytestmark = pytest.mark.vm


async def test_a_volume_through_create_suspend_resume_and_delete(
    kit: VolumeKit,
    hypervisor: QemuHypervisor,
    vm_settings: Settings,
    boot_image: BootImage,
    base_snapshot: SavedState,
) -> None:
    ledger = MemoryLedger()
    participant = VolumeParticipant(kit.volumes, ledger)
    volume_id = await kit.new_volume()
    vm_id = f"p{uuid.uuid4().hex[:10]}"
    run_dir = vm_settings.vms_dir / vm_id
    context = VmContext(
        vm_id=vm_id,
        owner_id=7,
        vcpu_count=base_snapshot.vcpu_count,
        memory_mb=base_snapshot.memory_mb,
        image=boot_image,
        run_dir=run_dir,
        restore_from=base_snapshot,
        mounts=(Mount(volume_id, "/data", read_only=False),),
    )
    saved_dir = vm_settings.snapshots_dir / f"suspend-{vm_id}"

    async def start(context: VmContext, launch: Launch):
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=context.vm_id,
                vcpu_count=context.vcpu_count,
                memory_mb=context.memory_mb,
                image=context.image,
                run_dir=context.run_dir,
                restore_from=context.restore_from,
                scsi_drives=tuple(launch.scsi_drives),
            )
        )
        await machine.wait_ready(vm_settings.boot_timeout_seconds)
        return kit.know(machine)

    try:
        # Create: restored from the base snapshot (which has no drives), so
        # the drive is recorded now and hot-plugged once the guest is up.
        launch = Launch()
        await participant.prepare(context, launch, ledger)
        assert launch.scsi_drives == []
        assert [row.kind for row in await ledger.of_vm(vm_id)] == ["volume-attachment"]
        machine = await start(context, launch)
        await participant.ready(context, machine, restored=True)
        await ok(machine, "echo kept > /data/state && sync")

        # Suspend: saved with the drive attached, the process gone, nothing released.
        await hypervisor.save(machine, saved_dir, keep_running=False)
        await hypervisor.destroy(vm_id, run_dir)
        kit.machines.pop(vm_id)
        saved = hypervisor.saved_state(saved_dir)

        # Resume: the same drive (same id, same SCSI target) on the command
        # line, and the guest wakes up with the volume still mounted.
        resumed = replace(context, restore_from=saved)
        launch = Launch()
        await participant.prepare(resumed, launch, ledger)
        assert [drive.drive_id for drive in launch.scsi_drives] == [
            a.drive_id for a in kit.volumes.attachments(vm_id)
        ]
        machine = await start(resumed, launch)
        assert " /data ext4 rw" in await ok(machine, "cat /proc/mounts")
        await participant.ready(resumed, machine, restored=True)
        assert await ok(machine, "cat /data/state") == "kept\n"
        await ok(machine, "echo more >> /data/state && sync")

        # Delete: the running guest unmounts cleanly on release.
        await participant.release(vm_id, await ledger.of_vm(vm_id), ledger)
        assert not await drives(machine.qmp)
        assert await ledger.of_vm(vm_id) == []
        assert kit.volumes.attachments(vm_id) == []
        assert [r for r in await participant.inventory() if r.vm_id == vm_id] == []
        info = await kit.volumes.get(volume_id)
        assert not info.needs_check
    finally:
        await hypervisor.destroy(vm_id, run_dir)
        await kit.volumes.release(vm_id)
        shutil.rmtree(saved_dir, ignore_errors=True)


async def test_a_cold_boot_starts_with_its_drives_on_the_command_line(
    kit: VolumeKit, hypervisor: QemuHypervisor, vm_settings: Settings, boot_image: BootImage
) -> None:
    ledger = MemoryLedger()
    participant = VolumeParticipant(kit.volumes, ledger)
    data, reference = await kit.new_volume(), await kit.new_volume()
    await kit.volumes.upload(reference, "ref.txt", b"reference\n")
    await kit.volumes.create_checkpoint(reference, "cp")
    vm_id = f"b{uuid.uuid4().hex[:10]}"
    context = VmContext(
        vm_id=vm_id,
        owner_id=None,
        vcpu_count=1,
        memory_mb=256,
        image=boot_image,
        run_dir=vm_settings.vms_dir / vm_id,
        mounts=(
            Mount(data, "/data", read_only=False),
            Mount(reference, "/ref", read_only=True, checkpoint_id="cp"),
        ),
    )
    launch = Launch()
    await participant.prepare(context, launch, ledger)
    assert [(d.read_only, d.path.suffix) for d in launch.scsi_drives] == [(False, ".qcow2"), (True, ".qcow2")]
    try:
        machine = await hypervisor.start(
            MachineSpec(
                vm_id=vm_id,
                vcpu_count=1,
                memory_mb=256,
                image=boot_image,
                run_dir=context.run_dir,
                scsi_drives=tuple(launch.scsi_drives),
            )
        )
        await machine.wait_ready(vm_settings.boot_timeout_seconds)
        kit.know(machine)
        await participant.ready(context, machine, restored=False)
        assert await ok(machine, "cat /ref/ref.txt") == "reference\n"
        await ok(machine, "echo booted > /data/f && sync")
        await participant.release(vm_id, await ledger.of_vm(vm_id), ledger)
        assert await ledger.all() == []
    finally:
        await hypervisor.destroy(vm_id, context.run_dir)
        await kit.volumes.release(vm_id)
    assert await kit.volumes.download(data, "f") == b"booted\n"


async def test_files_round_trip_and_no_symlink_leads_out(
    kit: VolumeKit, restore_vm
) -> None:
    volume_id = await kit.new_volume()
    blob = bytes(range(256)) * 1024 + os.urandom(300 * 1024) + b"\0\r\n\xff"

    # Unmounted: a helper VM does the work.
    entry = await kit.volumes.upload(volume_id, "dir/sub/blob.bin", blob)
    assert (entry.path, entry.size, entry.kind) == (
        "dir/sub/blob.bin",
        len(blob),
        "file",
    )
    assert await kit.volumes.download(volume_id, "dir/sub/blob.bin") == blob
    with pytest.raises(VolumeFileConflict):
        await kit.volumes.upload(volume_id, "dir/sub/blob.bin", b"again")
    await kit.volumes.upload(volume_id, "dir/sub/blob.bin", b"again", overwrite=True)
    assert await kit.volumes.download(volume_id, "dir/sub/blob.bin") == b"again"
    await kit.volumes.upload(volume_id, "dir/top.txt", b"t")
    listed = await kit.volumes.list_files(volume_id, prefix="dir/", recursive=True)
    assert [e.path for e in listed] == ["dir/sub", "dir/sub/blob.bin", "dir/top.txt"]
    assert [
        e.path for e in await kit.volumes.list_files(volume_id, prefix="dir/s")
    ] == ["dir/sub"]
    assert len(await kit.volumes.list_files(volume_id, recursive=True, limit=2)) == 2

    # Links made by a guest, pointing out of the volume.
    vm = kit.know(await restore_vm())
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    await ok(
        vm,
        "ln -s /etc/passwd /data/link && ln -s /etc /data/etc && ln -s ../../.. /data/dir/up && sync",
    )
    await kit.volumes.detach(vm, volume_id, "/data")
    for refused in (
        kit.volumes.download(volume_id, "link"),
        kit.volumes.download(volume_id, "etc/passwd"),
        kit.volumes.download(volume_id, "dir/up/etc/passwd"),
        kit.volumes.download(volume_id, "../etc/passwd"),
        kit.volumes.upload(volume_id, "etc/evil", b"x"),
        kit.volumes.upload(volume_id, "link", b"x", overwrite=True),
        kit.volumes.delete_file(volume_id, "etc/passwd"),
        kit.volumes.list_files(volume_id, prefix="etc/"),
    ):
        with pytest.raises(PathRefused):
            await refused
    everything = {
        e.path: e.kind for e in await kit.volumes.list_files(volume_id, recursive=True)
    }
    assert everything["etc"] == "symlink" and not any(
        p.startswith("etc/") for p in everything
    )
    await kit.volumes.delete_file(volume_id, "link")  # the link itself, not its target
    with pytest.raises(VolumeFileNotFound):
        await kit.volumes.download(volume_id, "link")

    # Mounted rw in a VM: the same calls go through that VM.
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    await kit.volumes.upload(volume_id, "from-host.bin", blob)
    guest_sum = (await ok(vm, "md5sum /data/from-host.bin")).split()[0]
    assert guest_sum == hashlib.md5(blob).hexdigest()
    await ok(vm, "head -c 1000 /dev/urandom > /data/from-guest && sync")
    assert len(await kit.volumes.download(volume_id, "from-guest")) == 1000
    await kit.volumes.delete_file(volume_id, "dir", recursive=True)
    assert (await run(vm, "test -e /data/dir"))[0] != 0
    await kit.volumes.detach(vm, volume_id, "/data")


async def test_kill_9_loses_no_synced_write_and_the_volume_mounts_again(
    kit: VolumeKit, restore_vm
) -> None:
    volume_id = await kit.new_volume()
    vm = kit.know(await restore_vm())
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    await ok(
        vm,
        "head -c 2000000 /dev/urandom > /data/synced && md5sum /data/synced > /data/synced.md5 && sync",
    )
    expected = await ok(vm, "cat /data/synced.md5")
    # Written after the sync: may or may not survive, but must not break anything.
    await ok(vm, "head -c 3000000 /dev/urandom > /data/unsynced")
    os.kill(vm.pid, signal.SIGKILL)
    while process_is_alive(vm.pid):
        await asyncio.sleep(0.01)
    kit.machines.pop(vm.vm_id)
    await kit.volumes.release(vm.vm_id)  # what the reconciler does for a dead VM
    assert (await kit.volumes.get(volume_id)).needs_check

    later = kit.know(await restore_vm())
    await kit.volumes.attach(
        later, Mount(volume_id, "/data", read_only=False)
    )  # checked first
    assert not (await kit.volumes.get(volume_id)).needs_check
    assert await ok(later, "md5sum /data/synced") == expected
    await ok(later, "echo writable > /data/after && sync")
    await kit.volumes.detach(later, volume_id, "/data")
