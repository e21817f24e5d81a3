"""The QEMU command line of a VM (pure functions: no processes, no files)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from kiln.runtime.driver import BootImage, MachineSpec, Nic, ScsiDrive
from kiln.runtime.qemu.paths import RunPaths

QEMU_BINARY = "qemu-system-x86_64"

# TCG translation-block cache per VM. QEMU's default is 1 GiB, which a guest
# fills as it runs new code; 64 MiB bounds it (measured here: a 256 MB guest
# after boot and a few python starts, 275 MB RSS instead of 329 MB) at no
# measurable cost in boot or exec time.
TCG_TB_SIZE_MB = 64

# No address-space randomisation in a TCG guest. TCG keeps translated code per
# (physical page, virtual address); with ASLR every new process maps ld.so,
# libc and the program at new addresses, so all of it is translated again at
# every exec. Measured here (a restored 256 MB guest, agent exec, medians):
# bash -c 'echo ok' 91 -> 33 ms, /bin/true 37 -> 17 ms, python3 -S -c pass
# 166-184 -> 129-142 ms. The trade-off (see README.md): ASLR inside the guest
# is defence in depth for the guest's own processes; the isolation boundary
# between tenants is the VM, which this does not touch. KVM guests keep ASLR.
TCG_GUEST_ARGUMENTS = "norandmaps"


def tcg_kernel_arguments() -> str:
    """Kernel arguments a guest gets under TCG.

    TCG offers no way for the kernel to calibrate the TSC (no PIT/HPET reference
    on microvm), and the boot hangs without it; TCG's TSC is the host's, so the
    host's frequency is the right value. ``TCG_GUEST_ARGUMENTS``: why no ASLR."""
    return f"tsc_early_khz={host_cpu_khz()} {TCG_GUEST_ARGUMENTS}"


def host_cpu_khz() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


def accel_arguments(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MB}", "-cpu", "max"]
    raise ValueError(f"unknown accelerator {accel!r}")


def kernel_command_line(image: BootImage, accel: str, tcg_arguments: str) -> str:
    """The image's command line; under TCG plus each TCG argument it does not set itself."""
    if accel != "tcg":
        return image.cmdline
    present = {word.split("=", 1)[0] for word in image.cmdline.split()}
    added = [word for word in tcg_arguments.split() if word.split("=", 1)[0] not in present]
    return " ".join([image.cmdline, *added]).strip()


# The NIC's backend when the VM has no network: a hub port with nothing else on
# the hub, so frames the guest sends go nowhere. The device itself is always
# there, because a saved VM restores only into the same set of devices.
UNWIRED_NETDEV = "hubport,id=net0,hubid=0"


def network_arguments(nic: Nic) -> list[str]:
    """The virtio-net card, on the TAP fd the host wired for it, or unwired."""
    netdev = f"tap,id=net0,fd={nic.tap_fd},vhost=off" if nic.tap_fd is not None else UNWIRED_NETDEV
    return ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net0,mac={nic.mac}"]


def scsi_drive_arguments(drives: tuple[ScsiDrive, ...]) -> list[str]:
    """Volumes attached at start, on the virtio-scsi bus (JSON, so any path is safe)."""
    argv: list[str] = []
    for drive in drives:
        node = {
            "driver": drive.image_format,
            "node-name": drive.drive_id,
            "read-only": drive.read_only,
            "file": {"driver": "file", "filename": str(drive.path), "locking": "off"},
        }
        argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        target = f",scsi-id={drive.scsi_id},lun=0" if drive.scsi_id is not None else ""
        argv += [
            "-device",
            f"scsi-hd,bus=scsi0.0,drive={drive.drive_id},id={drive.drive_id},serial={drive.drive_id}{target}",
        ]
    return argv


# Every VM's RAM is this one memory backend, whatever its kind: migration matches
# RAM blocks by name, so a VM saved with one kind restores into another.
GUEST_RAM_ID = "guest-ram"


def memory_arguments(spec: MachineSpec, paths: RunPaths) -> list[str]:
    """Guest RAM: anonymous; or a shared file in the run dir (``memory_in_file``),
    which a final save takes as the snapshot's memory; or, restoring a snapshot
    whose memory is a file, that file mapped privately (copy-on-write), so every
    page no VM has written stays shared in the host's page cache."""
    size = f"size={spec.memory_mb}M"
    saved = spec.restore_from
    if saved is not None and saved.memory_file is not None:
        backend = f"memory-backend-file,id={GUEST_RAM_ID},{size},mem-path={saved.memory_file},share=off"
    elif spec.memory_in_file:
        backend = f"memory-backend-file,id={GUEST_RAM_ID},{size},mem-path={paths.memory_file},share=on"
    else:
        backend = f"memory-backend-ram,id={GUEST_RAM_ID},{size}"
    return ["-object", backend, "-machine", f"memory-backend={GUEST_RAM_ID}"]


def incoming_arguments(spec: MachineSpec) -> list[str]:
    """A restore waits for ``migrate-incoming``, sent once its migration
    capabilities are set over QMP (they must match the saving side's)."""
    return ["-incoming", "defer"] if spec.restore_from is not None else []


# QEMU's seccomp filter: no obsolete system calls, no setuid/setgid, no
# fork/exec (saves go through file descriptors, never ``exec:``), no changes to
# scheduling or resource limits. The process already runs unprivileged.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def build_argv(
    spec: MachineSpec,
    accel: str,
    paths: RunPaths,
    *,
    binary: str = QEMU_BINARY,
    tcg_arguments: str = f"tsc_early_khz=2000000 {TCG_GUEST_ARGUMENTS}",
) -> list[str]:
    """The full QEMU command line of a cold boot. Paths are used as given: pass
    absolute ones, since adoption recognises the process by its run dir."""
    image = spec.image
    return [
        binary,
        "-name", f"kiln-{spec.vm_id}",
        "-M", "microvm,acpi=on",  # the Debian kernel finds virtio-mmio devices via ACPI only
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", SANDBOX,
        *accel_arguments(accel),
        "-smp", str(spec.vcpu_count),
        "-m", str(spec.memory_mb),
        *memory_arguments(spec, paths),
        *incoming_arguments(spec),
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_command_line(image, accel, tcg_arguments),
        # No file locking: see switch_to_overlay.
        "-drive", f"id=root,if=none,format=qcow2,file={paths.overlay},discard=unmap,file.locking=off",
        "-device", "virtio-blk-device,drive=root",
        "-chardev", f"socket,id=agent,path={paths.agent_socket},server=on,wait=off",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=agent,name=kiln.agent",
        # Entropy from the host's RNG, so the guest's pool is ready early at boot.
        "-device", "virtio-rng-device",
        # Volumes are hot-plugged here later: microvm has no PCI hotplug.
        "-device", "virtio-scsi-device,id=scsi0",
        *network_arguments(spec.nic),
        *scsi_drive_arguments(spec.scsi_drives),
        "-chardev", f"socket,id=qmp,path={paths.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # Appended to (O_APPEND), so Kiln can cut its head while QEMU writes (console.cap).
        "-chardev", f"file,id=console,path={paths.console_log},append=on",
        "-serial", "chardev:console",
        "-pidfile", str(paths.pid_file),
    ]  # fmt: skip

