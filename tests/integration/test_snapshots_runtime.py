"""Saving and restoring real VMs with the QEMU driver (no service, no database)."""

from __future__ import annotations

import base64
import os
import stat
import time
from pathlib import Path

import pytest
from integration.guest_shell import shell

from kiln.config import Settings
from kiln.runtime.driver import BootImage, MachineSpec, SavedState
from kiln.runtime.errors import BootError
from kiln.runtime.qemu import QemuHypervisor, QemuMachine
from kiln.runtime.qemu.paths import SavedPaths
from kiln.runtime.snapshots import BaseSnapshots, Shape

pytestmark = pytest.mark.vm


async def python(machine: QemuMachine, code: str, session: str = "s") -> str:
    output = b""
    async for frame in machine.agent.stream("python_exec", session=session, code=code, timeout=30):
        if frame["kind"] == "stdout":
            output += base64.b64decode(frame["data"])
    return output.decode()


def memory_use_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB, from smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


async def test_two_vms_from_one_snapshot_differ_in_randomness_and_keep_the_host_time(
    restore_vm,
) -> None:
    first, second = await restore_vm(), await restore_vm()
    readings = []
    for machine in (first, second):
        output = await shell(
            machine,
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
            " cat /proc/sys/kernel/random/uuid; date +%s.%N; hostname",
        )
        host_time = time.time()
        random_bytes, kernel_uuid, guest_time, hostname = output.split()
        readings.append((random_bytes, kernel_uuid))
        assert abs(float(guest_time) - host_time) < 1.0, (guest_time, host_time)
        assert hostname == machine.vm_id
    (first_random, first_uuid), (second_random, second_uuid) = readings
    assert first_random != second_random
    assert first_uuid != second_uuid


async def test_a_restored_vm_continues_with_files_processes_and_python_state(
    restore_vm, hypervisor: QemuHypervisor, vm_settings: Settings
) -> None:
    source = await restore_vm()
    await shell(source, "echo before > /root/file; (sleep 1000 &) ; true")
    await python(source, "counter = 41")
    started = time.monotonic()
    saved = await hypervisor.save(source, vm_settings.snapshots_dir / source.vm_id)
    print(f"\nsave (VM keeps running): {time.monotonic() - started:.3f}s")

    # The source keeps running, on a new overlay over the saved disk.
    await shell(source, "echo after > /root/later")
    assert await python(source, "counter += 1; print(counter)") == "42\n"

    clone = await restore_vm(saved=saved)
    assert await shell(clone, "cat /root/file") == "before\n"
    assert await shell(clone, "test -e /root/later && echo yes || echo no") == "no\n"
    assert await shell(clone, "pgrep -x sleep >/dev/null && echo alive") == "alive\n"
    assert await python(clone, "counter += 1; print(counter)") == "42\n"


async def test_data_written_between_saves_survives_them_all(
    restore_vm, hypervisor: QemuHypervisor, vm_settings: Settings
) -> None:
    """A save switches the VM to a new layer and reopens the old one read-only
    by its name: were a layer renamed, QEMU would reopen another file and lose
    what the guest wrote (found with 30 MB written, synced, saved, and read back
    from the disk with the page cache dropped)."""
    source = await restore_vm()
    sums = []
    for round_ in range(3):
        await shell(source, f"head -c 30000000 /dev/urandom > /root/f{round_}; sync")
        sums.append(await shell(source, f"sha256sum < /root/f{round_}"))
        await hypervisor.save(source, vm_settings.snapshots_dir / f"{source.vm_id}-{round_}")
    await shell(source, "sync; echo 3 > /proc/sys/vm/drop_caches")
    for round_, expected in enumerate(sums):
        assert await shell(source, f"sha256sum < /root/f{round_}") == expected, round_
    stopped = await hypervisor.save(source, vm_settings.snapshots_dir / f"{source.vm_id}-end", keep_running=False)
    clone = await restore_vm(saved=stopped)
    await shell(clone, "echo 3 > /proc/sys/vm/drop_caches")
    for round_, expected in enumerate(sums):
        assert await shell(clone, f"sha256sum < /root/f{round_}") == expected, round_


async def test_saved_files_are_read_only_and_a_stopped_vm_restores(
    restore_vm, hypervisor: QemuHypervisor, vm_settings: Settings
) -> None:
    source = await restore_vm()
    await shell(source, "echo kept > /root/file")
    saved = await hypervisor.save(
        source, vm_settings.snapshots_dir / source.vm_id, keep_running=False
    )
    assert not source.is_alive()
    assert stat.S_IMODE(saved.directory.stat().st_mode) == 0o700
    for path in saved.directory.iterdir():
        # Only the owner reads a save; nothing but the privately mapped RAM file is writable.
        expected = 0o600 if path == SavedPaths(saved.directory).memory else 0o400
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    clone = await restore_vm(saved=saved)
    assert await shell(clone, "cat /root/file") == "kept\n"


async def test_a_snapshot_restores_only_with_its_own_shape(
    hypervisor: QemuHypervisor, boot_image: BootImage, base_snapshot: SavedState, vm_settings
) -> None:
    vm_id = "wrongshape"
    try:
        with pytest.raises(BootError, match="memory_mb 256"):
            await hypervisor.start(
                MachineSpec(
                    vm_id=vm_id,
                    vcpu_count=base_snapshot.vcpu_count,
                    memory_mb=512,
                    image=boot_image,
                    run_dir=vm_settings.vms_dir / vm_id,
                    restore_from=base_snapshot,
                )
            )
    finally:
        await hypervisor.destroy(vm_id, vm_settings.vms_dir / vm_id)


async def test_restored_vms_share_the_snapshot_memory(restore_vm) -> None:
    """The base snapshot's RAM file is mapped copy-on-write: pages no clone wrote
    are counted once for all of them (PSS well under RSS)."""
    machines = [await restore_vm() for _ in range(3)]
    usage = [memory_use_kb(machine.pid) for machine in machines]
    print("\n(RSS kB, PSS kB) per restored VM:", usage)
    total_rss = sum(rss for rss, _ in usage)
    total_pss = sum(pss for _, pss in usage)
    assert total_pss < total_rss


async def test_base_snapshots_are_cached_per_shape(
    vm_settings: Settings, hypervisor: QemuHypervisor, boot_image: BootImage, base_snapshot
) -> None:
    snapshots = BaseSnapshots(vm_settings, hypervisor)
    assert snapshots.find(boot_image, Shape(256, 1)) == base_snapshot
    assert snapshots.find(boot_image, Shape(256, 3)) is None
    rows = snapshots.describe()
    assert any(row["memory_mb"] == 256 and row["vcpu_count"] == 1 for row in rows)
    assert os.path.isdir(rows[0]["path"])
