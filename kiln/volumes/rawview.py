"""A raw view of a qcow2 chain for e2fsprogs, without mounting anything.

e2fsprogs read raw block devices or files, not qcow2. ``qemu-storage-daemon``
opens the chain with QEMU's own block layer and exports it as one FUSE file
holding the raw disk; ``e2fsck``/``resize2fs``/``dumpe2fs`` then work on that
file as an unprivileged user. The host kernel only ever sees a regular file
(FUSE), never the user's ext4: nothing of a hostile image reaches the
kernel's filesystem code.

The unprivileged tool gets the file as an inherited descriptor opened by this
process, named ``/dev/fd/N``, so it needs no path through the data dir (which
stays root-only); the export is chowned to that user and allows other users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

from kiln.volumes.errors import VolumeError
from kiln.volumes.layout import VolumePaths
from kiln.volumes.tools import Identity

log = logging.getLogger(__name__)

STORAGE_DAEMON = "qemu-storage-daemon"
READY_SECONDS = 15.0
STOP_SECONDS = 5.0
POLL_SECONDS = 0.01


@contextlib.asynccontextmanager
async def raw_view(
    paths: VolumePaths, image: Path, *, writable: bool, owner: Identity
) -> AsyncIterator[RawView]:
    """The chain topped by ``image`` as a raw file that ``owner`` can open as
    ``view.device`` from a process started with ``pass_fds=view.pass_fds``.
    Hold the volume's lock (and make sure no VM has the image) meanwhile."""
    directory = paths.raw_dir(secrets.token_hex(4))
    directory.mkdir(mode=0o700)
    mountpoint = directory / "disk"
    mountpoint.touch(mode=0o600)
    process: subprocess.Popen | None = None
    fd: int | None = None
    try:
        process = start_daemon(directory, image, mountpoint, writable)
        await wait_mounted(process, directory, mountpoint)
        os.chown(mountpoint, owner.uid, owner.gid)
        fd = os.open(mountpoint, os.O_RDWR if writable else os.O_RDONLY)
        os.set_inheritable(fd, True)
        yield RawView(fd)
    finally:
        if fd is not None:
            os.close(fd)
        if process is not None:
            await stop_daemon(process, mountpoint)
        shutil.rmtree(directory, ignore_errors=True)


class RawView:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def device(self) -> Path:
        return Path(f"/dev/fd/{self.fd}")

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.fd,)


def start_daemon(
    directory: Path, image: Path, mountpoint: Path, writable: bool
) -> subprocess.Popen:
    node = {
        "driver": "qcow2",
        "node-name": "volume",
        "read-only": not writable,
        "file": {"driver": "file", "filename": str(image)},
    }
    export = {
        "type": "fuse",
        "id": "raw",
        "node-name": "volume",
        "mountpoint": str(mountpoint),
        "writable": writable,
        "allow-other": "on",
    }
    argv = [
        STORAGE_DAEMON,
        "--blockdev", json.dumps(node),
        "--export", json.dumps(export),
        "--pidfile", str(directory / "daemon.pid"),
    ]  # fmt: skip
    log_file = (directory / "daemon.log").open("wb")
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    finally:
        log_file.close()


async def wait_mounted(
    process: subprocess.Popen, directory: Path, mountpoint: Path
) -> None:
    """Until the FUSE file is in place (it sits on another device than its directory)."""
    parent_device = directory.stat().st_dev
    deadline = time.monotonic() + READY_SECONDS
    while True:
        if process.poll() is not None:
            output = (directory / "daemon.log").read_text(errors="replace").strip()
            raise VolumeError(
                f"{STORAGE_DAEMON} exited ({process.returncode}): {output[-1500:]}"
            )
        with contextlib.suppress(OSError):
            if mountpoint.stat().st_dev != parent_device:
                return
        if time.monotonic() > deadline:
            raise VolumeError(
                f"{STORAGE_DAEMON} did not export {mountpoint} within {READY_SECONDS:g}s"
            )
        await asyncio.sleep(POLL_SECONDS)


async def stop_daemon(process: subprocess.Popen, mountpoint: Path) -> None:
    """SIGTERM unmounts the export and flushes the image; SIGKILL and a lazy
    unmount if it does not go."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    if process.poll() is None:
        log.warning("%s for %s ignored SIGTERM; killing it", STORAGE_DAEMON, mountpoint)
        process.kill()
        process.wait()
    unmount_if_mounted(mountpoint)


def unmount_if_mounted(mountpoint: Path) -> None:
    if is_mount_point(mountpoint):
        subprocess.run(
            ["umount", "-l", str(mountpoint)], check=False, capture_output=True
        )


def is_mount_point(path: Path) -> bool:
    target = str(path)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return True
    return False


def remove_stale_views(paths: VolumePaths) -> None:
    """Raw views a dead process left (call with the volume's lock held, when
    no view of this process can be live): stop their daemon if it still runs,
    unmount, remove."""
    for directory in paths.root.glob(".raw-*"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((directory / "daemon.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if (
                STORAGE_DAEMON.encode() in cmdline
                and str(directory).encode() in cmdline
            ):
                os.kill(pid, signal.SIGKILL)
        unmount_if_mounted(directory / "disk")
        shutil.rmtree(directory, ignore_errors=True)
