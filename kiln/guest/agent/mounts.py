"""Volumes inside the guest: mount, umount, fsfreeze, fsthaw, disk_usage.

The host attaches a volume as a SCSI disk whose serial is the volume's drive id
(``disks.py`` finds it); these ops put its ext4 filesystem at a path, take it
away cleanly before the host detaches it, and freeze it while the host takes a
checkpoint. Every op is bounded by its ``timeout``: a disk that never appears,
a long filesystem check or a process that will not let go of a mount ends in an
error, never in a request that waits forever."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from .args import absolute_path_arg, arg, timeout_arg
from .config import AgentConfig
from .deadlines import Deadline, call_with_deadline
from .disks import (
    Disk,
    delete_disk,
    device_number,
    find_disk,
    serial_arg_check,
    wait_for_disk,
)
from .errors import AgentError
from .system import System
from .tools import run_tool
from .wire import Emit, Handler, log

MOUNT_TIMEOUT_SECONDS = 120.0  # includes the filesystem check
DISK_WAIT_SECONDS = 10.0  # for the disk to appear, within the timeout
UMOUNT_TIMEOUT_SECONDS = 60.0
FREEZE_TIMEOUT_SECONDS = 30.0
# A frozen filesystem blocks every writer in the guest; if the host that froze
# it never thaws it (it crashed), the agent does after this long.
THAW_AFTER_SECONDS = 60.0
MAX_TIMEOUT_SECONDS = 3600.0
USAGE_TIMEOUT_SECONDS = 10.0
# How often a forced unmount looks again whether the killed holders are gone.
HOLDERS_POLL_SECONDS = 0.05
# Never killed by a forced unmount: init, and the agent itself (a file another
# request has open there).
UNKILLABLE_PIDS = frozenset({1, os.getpid()})
# Paths a volume must not cover: the agent and the kernel's own filesystems.
RESERVED_PATHS = ("/opt/kiln", "/proc", "/sys", "/dev")

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

# e2fsck's exit status is a bit mask.
FSCK_CORRECTED = 1
FSCK_CORRECTED_REBOOT = 2
FSCK_UNCORRECTED = 4


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    device: int  # st_dev of the files on it (a block device's st_rdev)
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def read_mounts() -> list[Mount]:
    mounts = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            major, minor = fields[2].split(":")
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    device=os.makedev(int(major), int(minor)),
                    mount_point=unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fstype=fields[separator + 1],
                    source=unescape(fields[separator + 2]),
                )
            )
    return mounts


def mounted_at(path: str) -> Mount | None:
    """The mount visible at ``path`` (the last one, when mounts are stacked)."""
    found = [mount for mount in read_mounts() if mount.mount_point == path]
    return found[-1] if found else None


def holders(devices: set[int]) -> list[tuple[int, str]]:
    """Processes (pid, command name) with a working directory, root, program,
    open file or mapped file on one of ``devices``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        base = f"/proc/{entry}"
        if _holds(base, devices):
            try:
                with open(f"{base}/comm") as comm:
                    name = comm.read().strip()
            except OSError:
                continue  # it exited meanwhile
            found.append((int(entry), name))
    return found


def _holds(base: str, devices: set[int]) -> bool:
    links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"]
    try:
        links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
    except OSError:
        pass  # exited, or a kernel thread
    for link in links:
        try:
            if os.stat(link).st_dev in devices:
                return True
        except OSError:
            continue
    try:
        with open(f"{base}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] != "0":
                    major, minor = fields[3].split(":")
                    if os.makedev(int(major, 16), int(minor, 16)) in devices:
                        return True
    except OSError:
        pass
    return False


def describe_holders(found: list[tuple[int, str]]) -> str:
    shown = ", ".join(f"pid {pid} ({name})" for pid, name in found[:10])
    return shown + (f" and {len(found) - 10} more" if len(found) > 10 else "")


def mount_path_arg(args: dict[str, Any]) -> str:
    path = absolute_path_arg(args, "mount_path")
    if path == "/" or any(path == reserved or path.startswith(reserved + "/") for reserved in RESERVED_PATHS):
        raise AgentError("EINVAL", f"mount_path {path} is reserved (/, {', '.join(RESERVED_PATHS)})")
    return path


@dataclass
class Freeze:
    """A filesystem this agent froze, and the timer that thaws it if the host does not."""

    timer: threading.Timer


class Mounts:
    def __init__(self, config: AgentConfig, system: System) -> None:
        self.config = config
        self.system = system
        # Mounts and unmounts one at a time: each checks the mount table first.
        self.lock = threading.Lock()
        self.frozen: dict[str, Freeze] = {}
        self.auto_thawed: set[str] = set()
        self.freeze_lock = threading.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {
            "mount": self.op_mount,
            "umount": self.op_umount,
            "fsfreeze": self.op_fsfreeze,
            "fsthaw": self.op_fsthaw,
            "disk_usage": self.op_disk_usage,
        }

    # ---- mount

    def op_mount(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"serial", "mount_path", "read_only"=false, "fsck"=false, "timeout"=120,
        "wait"=10} -> {"device", "mount_path", "read_only", "fsck", "already_mounted"}

        Waits up to ``wait`` s for the disk (a hot-added disk appears
        asynchronously), checks its filesystem when asked, and mounts it as ext4
        with nodev,nosuid (read-only: ro,noload, so no journal is replayed).
        The same disk already mounted there the same way is a success
        (``already_mounted``); anything else at that path, or the disk mounted
        elsewhere, is EBUSY."""
        serial = serial_arg_check(arg(args, "serial", str))
        mount_path = mount_path_arg(args)
        read_only = arg(args, "read_only", bool, False)
        fsck = arg(args, "fsck", bool, False)
        deadline = Deadline(timeout_arg(args, MOUNT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS))
        wait = timeout_arg(args, DISK_WAIT_SECONDS, MAX_TIMEOUT_SECONDS, name="wait")
        self.system.require_own("mnt", "mount")
        deadline.acquire(self.lock, "mount")
        try:
            # The kernel resolves symlinks in the path; compare like with like.
            target = os.path.realpath(mount_path)
            existing = mounted_at(target)
            if existing is not None:
                return self._already_mounted(existing, serial, target, read_only)
            disk = wait_for_disk(
                self.config.sys_dir, self.config.dev_dir, serial, Deadline(min(wait, deadline.remaining()))
            )
            elsewhere = [
                mount.mount_point for mount in read_mounts() if mount.device == device_number(disk.device)
            ]
            if elsewhere:
                raise AgentError(
                    "EBUSY", f"disk {serial} ({disk.device}) is already mounted at {', '.join(elsewhere)}"
                )
            if disk.read_only and not read_only:
                raise AgentError("EACCES", f"disk {serial} is attached read-only: mount it with read_only")
            report = self.check_filesystem(disk, read_only, deadline) if fsck else None
            make_mount_point(target)
            options = "nodev,nosuid," + ("ro,noload" if read_only else "rw")
            result = run_tool(
                [self.config.busybox, "mount", "-t", "ext4", "-o", options, disk.device, target],
                deadline,
                f"mounting {disk.device}",
            )
            if result.exit_code != 0 or mounted_at(target) is None:
                raise AgentError(
                    "EIO", f"cannot mount {disk.device} (serial {serial}) at {target}: {result.output}"
                )
            return {
                "device": disk.device,
                "mount_path": target,
                "read_only": read_only,
                "fsck": report,
                "already_mounted": False,
            }
        finally:
            self.lock.release()

    def _already_mounted(self, existing: Mount, serial: str, target: str, read_only: bool) -> dict[str, Any]:
        disk = find_disk(self.config.sys_dir, self.config.dev_dir, serial)
        if (
            disk is not None
            and device_number(disk.device) == existing.device
            and existing.read_only == read_only
        ):
            # After a restore the guest still has the mount: calling again is fine.
            return {
                "device": disk.device,
                "mount_path": target,
                "read_only": read_only,
                "fsck": None,
                "already_mounted": True,
            }
        raise AgentError("EBUSY", f"{target} is already a mount point ({existing.source}, {existing.fstype})")

    def check_filesystem(self, disk: Disk, read_only: bool, deadline: Deadline) -> dict[str, Any]:
        """e2fsck before mounting: -p (repair what is safe to repair) for a
        read-write mount, -n (change nothing) for a read-only one. Errors it
        cannot repair fail a read-write mount with EIO."""
        check_only = read_only or disk.read_only
        result = run_tool(
            ["e2fsck", "-n" if check_only else "-p", disk.device],
            deadline,
            f"checking the filesystem on {disk.device}",
        )
        code = result.exit_code
        report = {
            "mode": "check" if check_only else "preen",
            "exit_code": code,
            "repaired": not check_only
            and code >= 0
            and bool(code & (FSCK_CORRECTED | FSCK_CORRECTED_REBOOT)),
            "errors_left": code >= 0 and bool(code & FSCK_UNCORRECTED),
            "output": result.output,
        }
        if code < 0 or code >= 8:
            raise AgentError("EIO", f"e2fsck could not check {disk.device} (exit {code}): {result.output}")
        if report["errors_left"] and not check_only:
            raise AgentError(
                "EIO",
                f"the filesystem on {disk.device} has errors e2fsck -p will not repair: {result.output}",
            )
        return report

    # ---- umount

    def op_umount(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"mount_path", "serial"?, "force"=false, "timeout"=60} -> {"unmounted", "deleted_device"}

        Syncs the filesystem, unmounts it (EBUSY naming the processes that hold
        it; with ``force`` they are killed first), and with ``serial`` deletes
        the disk from the guest's kernel so the host can detach it. A path that
        is not mounted is not an error (``unmounted`` false): retries are safe."""
        mount_path = absolute_path_arg(args, "mount_path")
        serial = arg(args, "serial", str, None)
        if serial is not None:
            serial_arg_check(serial)
        force = arg(args, "force", bool, False)
        deadline = Deadline(timeout_arg(args, UMOUNT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS))
        self.system.require_own("mnt", "umount")
        deadline.acquire(self.lock, "umount")
        try:
            target = os.path.realpath(mount_path)
            existing = mounted_at(target)
            disk = find_disk(self.config.sys_dir, self.config.dev_dir, serial) if serial is not None else None
            if existing is not None:
                if disk is not None and device_number(disk.device) != existing.device:
                    raise AgentError(
                        "EINVAL", f"{target} is {existing.source}, not the disk with serial {serial}"
                    )
                with self.freeze_lock:
                    if target in self.frozen:
                        raise AgentError("EBUSY", f"{target} is frozen: fsthaw it first")
                self._unmount(existing, target, force, deadline)
            deleted = None
            if disk is not None:
                still = [
                    mount.mount_point for mount in read_mounts() if mount.device == device_number(disk.device)
                ]
                if still:
                    raise AgentError("EBUSY", f"disk {serial} is still mounted at {', '.join(still)}")
                delete_disk(disk, deadline)
                deleted = disk.device
            return {"unmounted": existing is not None, "deleted_device": deleted}
        finally:
            self.lock.release()

    def _unmount(self, mount: Mount, target: str, force: bool, deadline: Deadline) -> None:
        # This filesystem's data only (sync -f is syncfs): a hung disk elsewhere
        # must not hold up this unmount.
        synced = run_tool([self.config.busybox, "sync", "-f", target], deadline, f"syncing {target}")
        if synced.exit_code != 0:
            raise AgentError("EIO", f"cannot sync {target}: {synced.output}")
        while True:
            result = run_tool([self.config.busybox, "umount", target], deadline, f"unmounting {target}")
            if not any(m.mount_id == mount.mount_id for m in read_mounts()):
                return
            below = [m for m in read_mounts() if m.mount_point.startswith(target + "/")]
            held_by = holders({mount.device, *(m.device for m in below)})
            killable = [(pid, name) for pid, name in held_by if pid not in UNKILLABLE_PIDS]
            if not force or not (killable or below):
                # Without force, or when force has nothing left it may do (the
                # holder is the agent itself, or nothing we can see holds it).
                reasons = []
                if held_by:
                    reasons.append(f"in use by {describe_holders(held_by)}")
                if below:
                    reasons.append(f"has mounts below it: {', '.join(m.mount_point for m in below)}")
                raise AgentError("EBUSY", f"cannot unmount {target}: {'; '.join(reasons) or result.output}")
            deadline.check(f"unmounting {target}")
            self._kill(killable)
            for inner in sorted(below, key=lambda m: m.mount_point, reverse=True):
                run_tool(
                    [self.config.busybox, "umount", inner.mount_point],
                    deadline,
                    f"unmounting {inner.mount_point}",
                )
            self._wait_until_released({mount.device, *(m.device for m in below)}, deadline)

    @staticmethod
    def _kill(found: list[tuple[int, str]]) -> None:
        for pid, _ in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _wait_until_released(devices: set[int], deadline: Deadline) -> None:
        while any(pid not in UNKILLABLE_PIDS for pid, _ in holders(devices)) and not deadline.expired:
            time.sleep(min(HOLDERS_POLL_SECONDS, deadline.remaining()))

    # ---- freeze and thaw

    def op_fsfreeze(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"mount_path", "timeout"=30, "thaw_after"=60} -> {"already_frozen"}

        Flushes the filesystem and blocks every writer until ``fsthaw`` (FIFREEZE);
        the agent thaws it by itself after ``thaw_after`` s, so a host that dies
        mid-checkpoint cannot wedge the guest. Not for the root filesystem."""
        target = self._mounted_target(args)
        deadline = Deadline(timeout_arg(args, FREEZE_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS))
        thaw_after = timeout_arg(args, THAW_AFTER_SECONDS, MAX_TIMEOUT_SECONDS, name="thaw_after")
        self.system.require_own("mnt", "fsfreeze")
        deadline.acquire(self.freeze_lock, "fsfreeze")
        try:
            already = False
            try:
                self._ioctl(target, FIFREEZE, deadline, "freezing")
            except OSError as exc:
                if exc.errno != errno.EBUSY:  # EBUSY: it is frozen already
                    raise
                already = True
            except AgentError:
                # Timed out, but the freeze may still complete: thaw it later.
                self._arm_thaw(target, thaw_after)
                raise
            self._arm_thaw(target, thaw_after)
            return {"already_frozen": already}
        finally:
            self.freeze_lock.release()

    def op_fsthaw(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"mount_path", "timeout"=30} -> {"thawed", "auto_thawed"}

        ``thawed`` is false when the filesystem was not frozen; ``auto_thawed``
        says the agent thawed it (``thaw_after`` passed) since it was frozen, so
        whatever the host captured meanwhile may not be consistent."""
        target = self._mounted_target(args)
        deadline = Deadline(timeout_arg(args, FREEZE_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS))
        self.system.require_own("mnt", "fsthaw")
        deadline.acquire(self.freeze_lock, "fsthaw")
        try:
            freeze = self.frozen.pop(target, None)
            if freeze is not None:
                freeze.timer.cancel()
            auto_thawed = target in self.auto_thawed
            self.auto_thawed.discard(target)
            try:
                self._ioctl(target, FITHAW, deadline, "thawing")
                thawed = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # it was not frozen
                    raise
                thawed = False
            return {"thawed": thawed, "auto_thawed": auto_thawed}
        finally:
            self.freeze_lock.release()

    def _mounted_target(self, args: dict[str, Any]) -> str:
        target = os.path.realpath(absolute_path_arg(args, "mount_path"))
        if target == "/":
            raise AgentError("EINVAL", "the root filesystem is not frozen: the agent itself writes to it")
        if mounted_at(target) is None:
            raise AgentError("EINVAL", f"{target} is not a mount point")
        return target

    @staticmethod
    def _ioctl(target: str, request: int, deadline: Deadline, doing: str) -> None:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        def call() -> None:
            try:
                fcntl.ioctl(fd, request, 0)
            finally:
                os.close(fd)  # here: a call still blocked at the deadline keeps its fd

        call_with_deadline(call, deadline, f"{doing} {target}")

    def _arm_thaw(self, target: str, after: float) -> None:
        """(Re)start the timer that thaws ``target`` if the host does not."""
        previous = self.frozen.pop(target, None)
        if previous is not None:
            previous.timer.cancel()
        timer = threading.Timer(after, self._auto_thaw, args=(target,))
        timer.daemon = True
        self.frozen[target] = Freeze(timer)
        self.auto_thawed.discard(target)
        timer.start()

    def _auto_thaw(self, target: str) -> None:
        with self.freeze_lock:
            freeze = self.frozen.get(target)
            if freeze is None or freeze.timer is not threading.current_thread():
                return  # thawed or frozen again meanwhile
            del self.frozen[target]
            self.auto_thawed.add(target)
        try:
            self._ioctl(target, FITHAW, Deadline(FREEZE_TIMEOUT_SECONDS), "thawing")
        except (OSError, AgentError) as exc:
            log(f"could not thaw {target} after its thaw_after: {exc}")

    # ---- usage

    def op_disk_usage(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"path", "timeout"=10} -> {"used_bytes", "total_bytes", "free_bytes"} of
        the filesystem holding ``path``; ``free_bytes`` is what an unprivileged
        writer may still use (reserved blocks excluded)."""
        path = absolute_path_arg(args, "path")
        deadline = Deadline(timeout_arg(args, USAGE_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS))
        usage = call_with_deadline(lambda: os.statvfs(path), deadline, f"reading the usage of {path}")
        return {
            "path": path,
            "total_bytes": usage.f_blocks * usage.f_frsize,
            "used_bytes": (usage.f_blocks - usage.f_bfree) * usage.f_frsize,
            "free_bytes": usage.f_bavail * usage.f_frsize,
        }


def make_mount_point(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except FileExistsError:
        raise AgentError("ENOTDIR", f"{path} exists and is not a directory") from None
    if not os.path.isdir(path):
        raise AgentError("ENOTDIR", f"{path} exists and is not a directory")
