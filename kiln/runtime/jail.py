"""Running QEMU unprivileged: the VMs' system user, what QEMU may see, and the
steps a VM's process takes between fork and exec.

- **The user.** Every VM's QEMU runs as one system user, ``kiln-vm`` (made at
  start when missing), with no supplementary groups but ``kvm`` when KVM is
  used. A QEMU escape gains that user: not root, none of the host's files that
  are not world-readable, not Kiln's database or keys; but the run dirs and
  saved states of the other VMs are that user's too (one user for all VMs:
  restores map base-snapshot RAM files that QEMU 7.2 must open read-write).
- **Paths.** QEMU opens its kernel, disks and snapshots by path, in the data
  and cache dirs; those may lie under a directory an unprivileged user cannot
  traverse (``~/.cache`` under ``/root``). The child then runs in a mount
  namespace of its own in which each such directory is hidden under an empty
  tmpfs and only Kiln's directories are bound back in: QEMU sees them and not
  the rest of it. The host's mounts are untouched.
- **The child**, before it executes QEMU (``preexec``): joins the VM's cgroups,
  builds that view, drops every group, takes the VM's gid and uid, and sets
  ``no_new_privs`` (no setuid binary can give root back; QEMU's seccomp
  sandbox is on too: ``cmdline.SANDBOX``).
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.runtime.cgroups import join

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_NOSUID = 2
MS_NODEV = 4
PR_SET_NO_NEW_PRIVS = 38
VM_USER = "kiln-vm"

# Loaded once in the parent: the child must not load libraries between fork and exec.
_libc = ctypes.CDLL(None, use_errno=True)


def vm_user(create: bool) -> tuple[tuple[int, int] | None, str]:
    """The VMs' user's (uid, gid), made when missing and ``create``; or None and
    the reason it cannot be had."""
    try:
        entry = pwd.getpwnam(VM_USER)
        return (entry.pw_uid, entry.pw_gid), ""
    except KeyError:
        pass
    if not create:
        return None, f"the user {VM_USER} does not exist"
    result = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", VM_USER],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return None, f"cannot make the user {VM_USER}: {result.stderr.strip() or result.returncode}"
    entry = pwd.getpwnam(VM_USER)
    return (entry.pw_uid, entry.pw_gid), ""


def kvm_group() -> int | None:
    """The group that may open /dev/kvm, if one does."""
    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


def traversable(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (no other groups) may pass through the directory."""
    info = path.stat()
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


@dataclass(frozen=True)
class Reveal:
    """In the child's view: an empty tmpfs over ``hidden`` with ``shown`` (each
    inside ``hidden``) bound back in at their own paths."""

    hidden: Path
    shown: tuple[Path, ...]


def plan_view(directories: Sequence[Path], uid: int, gid: int) -> tuple[Reveal, ...]:
    """What the child must reveal so that it can reach each of ``directories``
    (resolved). The directories themselves must be traversable (Kiln's own)."""
    hidden: dict[Path, list[Path]] = {}
    for directory in directories:
        directory = directory.resolve()
        for ancestor in reversed(directory.parents):
            if ancestor == Path("/"):
                continue
            if not traversable(ancestor, uid, gid):
                hidden.setdefault(ancestor, []).append(directory)
                break
    # A hidden directory inside another hidden one is covered by the outer tmpfs.
    outer = [path for path in hidden if not any(path != other and path.is_relative_to(other) for other in hidden)]
    reveals = []
    for path in sorted(outer):
        shown = sorted({d for h, ds in hidden.items() if h.is_relative_to(path) for d in ds})
        reveals.append(Reveal(path, tuple(shown)))
    return tuple(reveals)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def preexec(
    uid: int, gid: int, groups: Sequence[int], cgroup_procs: tuple[Path, ...], reveals: tuple[Reveal, ...]
) -> Callable[[], None]:
    """The function the VM's child runs between fork and exec (as root)."""
    tmpfs_options = b"mode=0755,size=1m"

    def run() -> None:
        join(cgroup_procs)
        if reveals:
            _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
            for reveal in reveals:
                # Opened before the tmpfs covers them: the binds come from these.
                fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in reveal.shown]
                hidden = os.fsencode(reveal.hidden)
                _check(_libc.mount(b"tmpfs", hidden, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_options), "tmpfs")
                for path, fd in zip(reveal.shown, fds, strict=True):
                    os.makedirs(path, exist_ok=True)
                    source = f"/proc/self/fd/{fd}".encode()
                    _check(_libc.mount(source, os.fsencode(path), None, MS_BIND | MS_REC, None), f"binding {path}")
                    os.close(fd)
        if os.geteuid() == 0:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")

    return run
