"""Volumes with real VMs (restored from the base snapshot), real qcow2 chains
and real ext4: mounts, ro, quota, checkpoints, hot attach and detach."""

from __future__ import annotations

import pytest
from integration.volumes_fixtures import MiB, VolumeKit, kit_fixture, ok, run  # noqa: F401

from kiln.node.participant import Mount
from kiln.runtime.errors import RuntimeFailure
from kiln.volumes import VolumeBusy, VolumeTooSmall, hotplug
from kiln.volumes.guest import ExecGuestVolumes
from kiln.volumes.layout import read_meta

pytestmark = pytest.mark.vm


async def test_data_written_by_one_vm_is_read_by_a_later_vm_and_ro_refuses_writes(
    kit: VolumeKit, restore_vm
) -> None:
    volume_id = await kit.new_volume()
    writer = kit.know(await restore_vm())
    await kit.volumes.attach(writer, Mount(volume_id, "/data", read_only=False))
    await ok(
        writer,
        "echo first-vm > /data/hello && mkdir -p /data/sub && echo deep > /data/sub/f && sync",
    )
    await kit.volumes.detach(writer, volume_id, "/data")
    assert "/data" not in await ok(writer, "cat /proc/mounts")
    assert not await hotplug.drives(writer.qmp)  # unplugged from QEMU too

    reader = kit.know(await restore_vm())
    await kit.volumes.attach(reader, Mount(volume_id, "/mnt/in", read_only=True))
    assert await ok(reader, "cat /mnt/in/hello /mnt/in/sub/f") == "first-vm\ndeep\n"
    code, _, err = await run(reader, "echo x > /mnt/in/new")
    assert code != 0 and "Read-only file system" in err
    assert " ro," in await ok(reader, "grep ' /mnt/in ' /proc/mounts")
    # The device itself is read-only: even a remount rw cannot write.
    assert (await ok(reader, "cat /sys/block/sd*/ro")).split() == ["1"]
    await kit.volumes.detach(reader, volume_id, "/mnt/in")


async def test_the_quota_holds_in_the_guest(kit: VolumeKit, restore_vm) -> None:
    volume_id = await kit.new_volume(32 * MiB)
    vm = kit.know(await restore_vm())
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    code, _, err = await run(
        vm, "dd if=/dev/zero of=/data/big bs=1M count=64 conv=fsync"
    )
    assert code != 0 and "No space left on device" in err
    total = int(
        (
            await ok(
                vm,
                "stat -f -c '%b*%S' /data | tr '*' ' ' | { read b s; echo $((b*s)); }",
            )
        ).strip()
    )
    assert total <= 32 * MiB
    await ok(vm, "rm /data/big && sync")
    await kit.volumes.detach(vm, volume_id, "/data")


async def test_rw_is_exclusive_and_ro_shares(kit: VolumeKit, restore_vm) -> None:
    volume_id = await kit.new_volume()
    first = kit.know(await restore_vm())
    second = kit.know(await restore_vm())
    await kit.volumes.attach(first, Mount(volume_id, "/data", read_only=False))
    with pytest.raises(VolumeBusy):
        await kit.volumes.attach(second, Mount(volume_id, "/data", read_only=True))
    with pytest.raises(VolumeBusy):
        await kit.volumes.attach(second, Mount(volume_id, "/data", read_only=False))
    assert not await hotplug.drives(second.qmp)  # a refused attach plugs nothing
    await kit.volumes.detach(first, volume_id, "/data")
    await kit.volumes.attach(first, Mount(volume_id, "/ro1", read_only=True))
    await kit.volumes.attach(second, Mount(volume_id, "/ro2", read_only=True))
    with pytest.raises(VolumeBusy):
        await kit.volumes.attach(second, Mount(volume_id, "/rw", read_only=False))
    for vm, path in ((first, "/ro1"), (second, "/ro2")):
        await kit.volumes.detach(vm, volume_id, path)


async def test_a_checkpoint_keeps_the_old_content_while_the_volume_moves_on(
    kit: VolumeKit, restore_vm
) -> None:
    volume_id = await kit.new_volume()
    vm = kit.know(await restore_vm())
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    await ok(vm, "echo before > /data/state")
    checkpoint = await kit.volumes.create_checkpoint(
        volume_id, "cp1"
    )  # online: frozen, then thawed
    await ok(vm, "echo after > /data/state && echo new > /data/added && sync")
    assert checkpoint.size_bytes > 0

    # The checkpoint, read-only, beside the live volume in the same VM.
    await kit.volumes.attach(
        vm, Mount(volume_id, "/old", read_only=True, checkpoint_id="cp1")
    )
    assert await ok(vm, "cat /old/state") == "before\n"
    assert await ok(vm, "cat /data/state") == "after\n"
    assert (await run(vm, "test -e /old/added"))[0] != 0
    await kit.volumes.detach(vm, volume_id, "/old")

    # rw on a checkpoint: the writes go to a throwaway layer.
    other = kit.know(await restore_vm())
    await kit.volumes.attach(
        other, Mount(volume_id, "/scratch", read_only=False, checkpoint_id="cp1")
    )
    await ok(other, "echo scribbled > /scratch/state && sync")
    await kit.volumes.detach(other, volume_id, "/scratch")
    await kit.volumes.attach(
        other, Mount(volume_id, "/again", read_only=True, checkpoint_id="cp1")
    )
    assert await ok(other, "cat /again/state") == "before\n"
    assert await ok(vm, "cat /data/state") == "after\n"
    await kit.volumes.detach(other, volume_id, "/again")
    await kit.volumes.detach(vm, volume_id, "/data")
    assert not list(kit.volumes.paths(volume_id).scratch_dir.iterdir())

    with pytest.raises(VolumeBusy):
        await kit.volumes.create_checkpoint(volume_id, "cp1")
    await kit.volumes.delete_checkpoint(volume_id, "cp1")
    info = await kit.volumes.get(volume_id)
    assert info.checkpoints == ()
    # Its layer merged into the top and removed: the top is the only file left.
    assert len(list(kit.volumes.paths(volume_id).layers.iterdir())) == 1
    reader = kit.know(await restore_vm())
    await kit.volumes.attach(reader, Mount(volume_id, "/data", read_only=True))
    assert await ok(reader, "cat /data/state /data/added") == "after\nnew\n"
    await kit.volumes.detach(reader, volume_id, "/data")


async def test_growing_a_mounted_volume_online(kit: VolumeKit, restore_vm) -> None:
    volume_id = await kit.new_volume(32 * MiB)
    vm = kit.know(await restore_vm())
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    code, _, err = await run(
        vm, "dd if=/dev/zero of=/data/big bs=1M count=40 conv=fsync"
    )
    assert code != 0 and "No space left on device" in err
    await ok(vm, "rm /data/big")
    info = await kit.volumes.resize(volume_id, 96 * MiB)
    assert info.size_bytes == 96 * MiB
    await ok(vm, "dd if=/dev/zero of=/data/big bs=1M count=40 conv=fsync")
    info = await kit.volumes.refresh_usage(volume_id)
    assert info.used_bytes >= 40 * MiB
    with pytest.raises(VolumeBusy):
        await kit.volumes.resize(volume_id, 64 * MiB)  # no shrinking while mounted
    await ok(vm, "md5sum /data/big > /data/big.md5 && sync")
    await kit.volumes.detach(vm, volume_id, "/data")

    # Offline: never below what it holds; above that, the data stays.
    with pytest.raises(VolumeTooSmall):
        await kit.volumes.resize(volume_id, 32 * MiB)
    assert (await kit.volumes.resize(volume_id, 64 * MiB)).size_bytes == 64 * MiB
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=True))
    await ok(vm, "cd /data && md5sum -c big.md5")
    total = int(
        (
            await ok(vm, "stat -f -c '%b %S' /data | { read b s; echo $((b*s)); }")
        ).strip()
    )
    assert 48 * MiB < total <= 64 * MiB
    await kit.volumes.detach(vm, volume_id, "/data")


async def test_a_failed_checkpoint_thaws_and_changes_nothing(
    kit: VolumeKit, restore_vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id = await kit.new_volume()
    vm = kit.know(await restore_vm())
    await kit.volumes.attach(vm, Mount(volume_id, "/data", read_only=False))
    await ok(vm, "echo one > /data/f")
    before = read_meta(kit.volumes.paths(volume_id))

    async def broken(*args: object) -> str:
        raise RuntimeFailure("blockdev-snapshot failed (injected)")

    monkeypatch.setattr(hotplug, "snapshot_drive", broken)
    with pytest.raises(RuntimeFailure, match="injected"):
        await kit.volumes.create_checkpoint(volume_id, "cp")
    monkeypatch.undo()
    # Thawed: a write completes (a frozen filesystem would block it to the timeout).
    await ok(vm, "echo two > /data/f && sync", timeout=30)
    after = read_meta(kit.volumes.paths(volume_id))
    assert (after.top, after.layers, after.pending) == (before.top, before.layers, None)
    assert sorted(p.name for p in kit.volumes.paths(volume_id).layers.iterdir()) == [
        f"{before.top}.qcow2"
    ]
    # And the guest's own watchdog thaws a freeze the host never ends.
    await ExecGuestVolumes(vm.agent).run_tool(
        "freeze", mount_path="/data", max_seconds=1
    )
    await ok(vm, "echo three > /data/f && sync", timeout=30)
    await kit.volumes.detach(vm, volume_id, "/data")
