"""Who owns a VM's files: the user its QEMU runs as (``Confinement``), or
Kiln's own user when QEMU is not confined. Run dirs are 0700, disks 0600 while
written and 0400 once saved, saved RAM 0600 (QEMU 7.2 opens a RAM file it
maps privately read-write), save directories 0700."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RUN_DIR_MODE = 0o700
DISK_MODE = 0o600
SAVED_DIR_MODE = 0o700
SAVED_FILE_MODE = 0o400
SAVED_MEMORY_MODE = 0o600


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def give(path: Path, owner: Owner | None, mode: int) -> None:
    """Make ``path`` the owner's (when QEMU runs as one) with ``mode``."""
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    path.chmod(mode)
