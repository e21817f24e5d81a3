"""The QEMU command line, built without running QEMU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kiln.runtime.driver import GUEST_MAC, BootImage, MachineSpec, Nic, ScsiDrive
from kiln.runtime.qemu.cmdline import build_argv
from kiln.runtime.qemu.paths import RunPaths
from kiln.runtime.qemu.process import process_is_alive, process_runs_in

IMAGE = BootImage(
    variant="default",
    kernel=Path("/images/vmlinuz"),
    initrd=Path("/images/initrd.img"),
    rootfs=Path("/images/rootfs.ext4"),
    cmdline="console=ttyS0 quiet",
)
RUN_DIR = Path("/var/kiln/vms/vm-1")


def spec(**changes: object) -> MachineSpec:
    fields: dict = {"vm_id": "vm-1", "vcpu_count": 2, "memory_mb": 384, "image": IMAGE, "run_dir": RUN_DIR}
    fields.update(changes)
    return MachineSpec(**fields)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[index + 1] for index, value in enumerate(argv) if value == option]


def test_machine_and_sizes() -> None:
    argv = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-M") == ["microvm,acpi=on"]
    assert option_values(argv, "-smp") == ["2"]
    assert option_values(argv, "-m") == ["384"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv


def test_boot_files_come_from_the_image() -> None:
    argv = build_argv(spec(), "tcg", RunPaths(RUN_DIR), tcg_arguments="tsc_early_khz=123")
    assert option_values(argv, "-kernel") == ["/images/vmlinuz"]
    assert option_values(argv, "-initrd") == ["/images/initrd.img"]
    assert option_values(argv, "-append") == ["console=ttyS0 quiet tsc_early_khz=123"]


def test_image_that_sets_the_tsc_itself_is_left_alone() -> None:
    image = BootImage("v", IMAGE.kernel, IMAGE.initrd, IMAGE.rootfs, "quiet tsc_early_khz=1")
    argv = build_argv(spec(image=image), "tcg", RunPaths(RUN_DIR))
    assert option_values(argv, "-append") == ["quiet tsc_early_khz=1 norandmaps"]


def test_tcg_guests_get_no_aslr_and_kvm_guests_keep_it() -> None:
    # TCG retranslates a process's code when ASLR moves it (see TCG_GUEST_ARGUMENTS).
    tcg = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    assert option_values(tcg, "-append")[0].split()[-1] == "norandmaps"
    kvm = build_argv(spec(), "kvm", RunPaths(RUN_DIR))
    assert "norandmaps" not in option_values(kvm, "-append")[0]


def test_tcg_and_kvm_accelerators() -> None:
    tcg = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    assert option_values(tcg, "-accel")[0].startswith("tcg")
    assert option_values(tcg, "-cpu") == ["max"]
    kvm = build_argv(spec(), "kvm", RunPaths(RUN_DIR))
    assert option_values(kvm, "-accel") == ["kvm"]
    assert option_values(kvm, "-append") == ["console=ttyS0 quiet"]
    with pytest.raises(ValueError):
        build_argv(spec(), "hvf", RunPaths(RUN_DIR))


def test_disk_is_the_overlay_in_the_run_dir() -> None:
    argv = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    (drive,) = option_values(argv, "-drive")
    assert "format=qcow2" in drive
    assert f"file={RUN_DIR}/overlay.qcow2" in drive
    assert "virtio-blk-device,drive=root" in option_values(argv, "-device")
    assert "/images/rootfs.ext4" not in " ".join(argv)  # the base is only the overlay's backing file


def test_agent_port_qmp_console_and_pidfile() -> None:
    argv = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    chardevs = option_values(argv, "-chardev")
    assert f"socket,id=agent,path={RUN_DIR}/agent.sock,server=on,wait=off" in chardevs
    assert f"socket,id=qmp,path={RUN_DIR}/qmp.sock,server=on,wait=off" in chardevs
    devices = option_values(argv, "-device")
    assert "virtio-serial-device" in devices
    assert "virtserialport,chardev=agent,name=kiln.agent" in devices
    assert "virtio-scsi-device,id=scsi0" in devices
    assert "virtio-rng-device" in devices
    assert option_values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert f"file,id=console,path={RUN_DIR}/console.log,append=on" in chardevs
    assert option_values(argv, "-serial") == ["chardev:console"]
    assert option_values(argv, "-pidfile") == [f"{RUN_DIR}/qemu.pid"]


def test_every_vm_has_a_nic_unwired_unless_given_a_tap() -> None:
    argv = build_argv(spec(), "tcg", RunPaths(RUN_DIR))
    assert option_values(argv, "-netdev") == ["hubport,id=net0,hubid=0"]
    assert f"virtio-net-device,netdev=net0,mac={GUEST_MAC}" in option_values(argv, "-device")
    wired = build_argv(spec(nic=Nic(tap_fd=7)), "tcg", RunPaths(RUN_DIR))
    assert option_values(wired, "-netdev") == ["tap,id=net0,fd=7,vhost=off"]


def test_scsi_drives_are_attached_read_only_when_asked() -> None:
    drive = ScsiDrive("vol-1", Path("/data/volumes/a b,c/disk.qcow2"), read_only=True)
    argv = build_argv(spec(scsi_drives=(drive,)), "tcg", RunPaths(RUN_DIR))
    (blockdev,) = option_values(argv, "-blockdev")
    node = json.loads(blockdev)
    assert node["read-only"] is True
    assert node["file"]["filename"] == "/data/volumes/a b,c/disk.qcow2"
    assert "scsi-hd,bus=scsi0.0,drive=vol-1,id=vol-1,serial=vol-1" in option_values(argv, "-device")


def test_every_run_dir_file_is_named_on_the_command_line() -> None:
    # adopt() recognises a VM's process by its run dir appearing in its argv.
    argv = " ".join(build_argv(spec(), "tcg", RunPaths(RUN_DIR)))
    assert str(RUN_DIR) + "/" in argv


def test_liveness_of_this_process_and_a_missing_one(tmp_path: Path) -> None:
    assert process_is_alive(os.getpid())
    assert not process_is_alive(2**22 + 12345)
    assert not process_runs_in(os.getpid(), tmp_path)  # alive, but not a QEMU of that run dir
