"""SCSI disks (volumes the host attached on the virtio-scsi bus), found by the
serial the host gave them. There is no udev in the guest, so no
/dev/disk/by-id: the serial is read from each disk's VPD page 0x80 in sysfs."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from .deadlines import Deadline, call_with_deadline
from .errors import AgentError

# How often a missing disk is looked for again while waiting for it.
DISK_POLL_SECONDS = 0.05
# While waiting, the SCSI buses are rescanned this often: a disk attached while
# the guest was not running (at the start of a VM restored from a snapshot that
# had no such disk) announces itself to no one.
RESCAN_EVERY_SECONDS = 2.0
MAX_SERIAL_CHARS = 64


@dataclass(frozen=True)
class Disk:
    name: str  # sdb
    device: str  # /dev/sdb
    sys_path: str  # /sys/block/sdb
    serial: str
    read_only: bool  # attached read-only by the host


def serial_of(block_dir: str) -> str | None:
    """The unit serial number (VPD page 0x80) of a SCSI disk, or None."""
    try:
        with open(os.path.join(block_dir, "device", "vpd_pg80"), "rb") as page:
            data = page.read()
    except OSError:
        return None
    # Byte 1 is the page code, bytes 2-3 the length of the serial after the header.
    if len(data) < 4 or data[1] != 0x80:
        return None
    length = int.from_bytes(data[2:4], "big")
    return data[4 : 4 + length].decode("ascii", "replace").strip(" \0")


def scsi_disks(sys_dir: str, dev_dir: str) -> list[Disk]:
    """Every SCSI disk (sd*) that has a serial and a device node. The root disk
    (virtio-blk, vda) is never among them."""
    block = os.path.join(sys_dir, "block")
    disks = []
    for name in sorted(os.listdir(block)) if os.path.isdir(block) else []:
        if not name.startswith("sd"):
            continue
        sys_path = os.path.join(block, name)
        serial = serial_of(sys_path)
        device = os.path.join(dev_dir, name)
        if serial is None or not is_block_device(device):
            continue  # not probed yet, or its node is still being made
        disks.append(Disk(name, device, sys_path, serial, read_flag(os.path.join(sys_path, "ro"))))
    return disks


def find_disk(sys_dir: str, dev_dir: str, serial: str) -> Disk | None:
    matches = [disk for disk in scsi_disks(sys_dir, dev_dir) if disk.serial == serial]
    if len(matches) > 1:
        raise AgentError(
            "EINVAL", f"{len(matches)} disks have the serial {serial!r}: {[d.device for d in matches]}"
        )
    return matches[0] if matches else None


def wait_for_disk(sys_dir: str, dev_dir: str, serial: str, deadline: Deadline) -> Disk:
    """The disk with ``serial``, waiting for it to appear until the deadline;
    ENOENT if it does not."""
    next_rescan = 0.0
    while True:
        disk = find_disk(sys_dir, dev_dir, serial)
        if disk is not None:
            return disk
        if deadline.expired:
            raise AgentError(
                "ENOENT", f"no SCSI disk with the serial {serial!r} appeared within {deadline.seconds:g} s"
            )
        if time.monotonic() >= next_rescan:
            rescan_scsi_hosts(sys_dir, deadline)
            next_rescan = time.monotonic() + RESCAN_EVERY_SECONDS
        time.sleep(min(DISK_POLL_SECONDS, deadline.remaining()))


def rescan_scsi_hosts(sys_dir: str, deadline: Deadline) -> None:
    """Ask every SCSI host adapter to scan its bus for new disks."""
    hosts = os.path.join(sys_dir, "class", "scsi_host")
    for host in sorted(os.listdir(hosts)) if os.path.isdir(hosts) else []:
        scan = os.path.join(hosts, host, "scan")

        def write_scan(path: str = scan) -> None:
            with open(path, "w") as request:
                request.write("- - -\n")  # every channel, target and LUN

        try:
            call_with_deadline(write_scan, deadline, f"rescanning {host}")
        except OSError:
            continue  # a host adapter that cannot scan: the others still may
        except AgentError:
            return  # the deadline passed: the caller reports the missing disk


def delete_disk(disk: Disk, deadline: Deadline) -> None:
    """Detach the disk from the guest's kernel (it flushes its cache first), so
    the host can then remove the device without the guest seeing it vanish."""

    def write_delete() -> None:
        with open(os.path.join(disk.sys_path, "device", "delete"), "w") as request:
            request.write("1\n")

    call_with_deadline(write_delete, deadline, f"deleting {disk.device}")


def device_number(device: str) -> int:
    """st_rdev of a block device node (what mountinfo and st_dev name it by)."""
    return os.stat(device).st_rdev


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def read_flag(path: str) -> bool:
    try:
        with open(path) as flag:
            return flag.read().strip() == "1"
    except OSError:
        return False


def serial_arg_check(serial: str) -> str:
    if not 1 <= len(serial) <= MAX_SERIAL_CHARS or not all(
        c.isascii() and c.isprintable() and c not in " /" for c in serial
    ):
        raise AgentError(
            "EINVAL", f"serial must be 1-{MAX_SERIAL_CHARS} printable ASCII characters, no spaces or '/'"
        )
    return serial
