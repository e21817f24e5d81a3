"""The QEMU driver with real VMs booted from the default image."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from integration.guest_shell import shell

from kiln.config import Settings
from kiln.runtime.driver import BootImage, MachineSpec
from kiln.runtime.errors import BootError
from kiln.runtime.qemu import QemuHypervisor, QemuMachine
from kiln.runtime.qemu.paths import RunPaths

pytestmark = pytest.mark.vm


def qemu_pids_using(run_dir: Path) -> list[int]:
    marker = str(run_dir.resolve()).encode() + b"/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_cold_boot_gets_the_cpus_and_memory_asked_for(start_vm) -> None:
    started = time.monotonic()
    machine = await start_vm(vcpu_count=2, memory_mb=384)
    boot_seconds = time.monotonic() - started
    print(f"\ncold boot to a ready agent: {boot_seconds:.2f}s ({machine.accel})")

    assert (await shell(machine, "nproc")).strip() == "2"
    meminfo = await shell(machine, "cat /proc/meminfo")
    mem_total_kib = int(meminfo.split("MemTotal:")[1].split()[0])
    # MemTotal leaves out what the kernel reserves for itself (its image, page
    # tables, crash areas), about a tenth of a small guest.
    assert 0.85 * 384 * 1024 <= mem_total_kib <= 384 * 1024
    assert await machine.qmp.status() == "running"


async def test_many_concurrent_calls_over_one_port(ready_vm: QemuMachine) -> None:
    execs = [ready_vm.agent.call("exec", argv=["echo", str(number)], timeout=60) for number in range(30)]
    pings = [ready_vm.agent.call("ping", timeout=60) for _ in range(30)]
    outputs = [shell(ready_vm, f"echo out-{number}") for number in range(10)]
    results = await asyncio.gather(*execs, *pings, *outputs)
    assert all(value["exit_code"] == 0 for value in results[:30])
    assert len({value["pid"] for value in results[30:60]}) == 1
    assert results[60:] == [f"out-{number}\n" for number in range(10)]


async def test_pause_and_resume_over_qmp(ready_vm: QemuMachine) -> None:
    await ready_vm.qmp.pause()
    assert await ready_vm.qmp.status() == "paused"
    await ready_vm.qmp.resume()
    assert await ready_vm.qmp.status() == "running"
    assert "pid" in await ready_vm.agent.call("ping", timeout=30)


@pytest.mark.parametrize("kernel", ["missing", "garbage"])
async def test_bad_kernel_fails_and_leaves_nothing_running(
    kernel: str, hypervisor: QemuHypervisor, boot_image: BootImage, vm_settings: Settings
) -> None:
    run_dir = vm_settings.vms_dir / f"bad-{kernel}"
    kernel_path = vm_settings.data_dir / f"{kernel}-vmlinuz"
    if kernel == "garbage":
        kernel_path.write_bytes(b"this is not a kernel\n" * 100)
    spec = MachineSpec(
        vm_id=f"bad-{kernel}",
        vcpu_count=1,
        memory_mb=256,
        image=replace(boot_image, kernel=kernel_path),
        run_dir=run_dir,
    )
    try:
        with pytest.raises(BootError) as raised:
            await hypervisor.start(spec)
        print(f"\n{kernel} kernel: {raised.value}")
        assert qemu_pids_using(run_dir) == []
        paths = RunPaths(run_dir.resolve())
        for leftover in paths.everything_but_the_console():
            assert not leftover.exists(), leftover
    finally:
        await hypervisor.destroy(spec.vm_id, run_dir)
        kernel_path.unlink(missing_ok=True)


async def test_guest_dying_during_boot_fails_fast_with_its_console(
    start_vm, boot_image: BootImage
) -> None:
    # No init in the initramfs: the kernel panics, and with -no-reboot QEMU exits.
    broken = replace(boot_image, cmdline=f"{boot_image.cmdline} rdinit=/no-such-init panic=-1")
    machine = await start_vm(image=broken, ready=False)
    started = time.monotonic()
    with pytest.raises(BootError, match="QEMU exited") as raised:
        await machine.wait_ready(timeout=120)
    assert time.monotonic() - started < 60
    assert "rdinit" in str(raised.value) or "panic" in str(raised.value).lower()


async def test_killed_qemu_is_seen_as_not_running(start_vm, hypervisor: QemuHypervisor) -> None:
    machine = await start_vm(ready=False)
    assert hypervisor.is_running(machine)
    os.kill(machine.pid, signal.SIGKILL)
    assert await wait_until(lambda: not hypervisor.is_running(machine), timeout=5)


async def test_destroy_leaves_no_process_and_no_run_dir(
    start_vm, hypervisor: QemuHypervisor
) -> None:
    machine = await start_vm()
    await hypervisor.destroy(machine.vm_id, machine.run_dir)
    assert not machine.run_dir.exists()
    assert qemu_pids_using(machine.run_dir) == []
    assert not hypervisor.is_running(machine)
    await hypervisor.destroy(machine.vm_id, machine.run_dir)  # idempotent


async def test_adopt_after_a_server_restart(
    start_vm, hypervisor: QemuHypervisor, vm_settings: Settings
) -> None:
    machine = await start_vm()
    first_agent_pid = (await machine.agent.call("ping", timeout=30))["pid"]
    # The old server goes away: its connections close, the VM keeps running.
    await machine.close_connections()

    restarted = QemuHypervisor(vm_settings)
    adopted = await restarted.adopt(machine.vm_id, machine.run_dir)
    assert adopted is not None
    assert (adopted.pid, adopted.vcpu_count, adopted.memory_mb) == (
        machine.pid,
        machine.vcpu_count,
        machine.memory_mb,
    )
    assert restarted.is_running(adopted)
    assert (await adopted.agent.call("ping", timeout=30))["pid"] == first_agent_pid
    assert await adopted.qmp.status() == "running"

    await restarted.destroy(adopted.vm_id, adopted.run_dir)
    assert not restarted.is_running(adopted)
    assert await restarted.adopt(machine.vm_id, machine.run_dir) is None


async def test_adopt_of_an_unknown_vm_is_none(hypervisor: QemuHypervisor, vm_settings: Settings) -> None:
    assert await hypervisor.adopt("nobody", vm_settings.vms_dir / "nobody") is None


async def test_forced_kvm_boots_or_fails_clearly(boot_image: BootImage, vm_settings: Settings) -> None:
    hypervisor = QemuHypervisor(vm_settings.model_copy(update={"accel": "kvm"}))
    run_dir = vm_settings.vms_dir / "forced-kvm"
    spec = MachineSpec("forced-kvm", 1, 256, boot_image, run_dir)
    try:
        try:
            machine = await hypervisor.start(spec)
        except BootError as error:
            assert "KILN_ACCEL=kvm" in str(error)
            assert qemu_pids_using(run_dir) == []
            assert not (run_dir / "overlay.qcow2").exists()
        else:
            assert machine.accel == "kvm"
            await machine.wait_ready(vm_settings.boot_timeout_seconds)
    finally:
        await hypervisor.destroy(spec.vm_id, run_dir)
