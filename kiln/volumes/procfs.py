"""Which processes have a file open, from ``/proc/<pid>/fd`` (the kernel
follows renames, so a layer renamed under a running QEMU shows its new name)."""

from __future__ import annotations

import os
from pathlib import Path


def holders(directory: Path) -> dict[str, set[int]]:
    """Every open file under ``directory`` (resolved), with the pids holding it."""
    prefix = str(directory.resolve()) + "/"
    found: dict[str, set[int]] = {}
    own = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                found.setdefault(target.removesuffix(" (deleted)"), set()).add(
                    int(entry.name)
                )
    return found


def is_held(path: Path) -> bool:
    return str(path.resolve()) in holders(path.parent)
