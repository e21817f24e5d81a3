"""The data disk's budget: a guest must never fill the host's disk.

Each running VM may still grow its disk by what its top layer can take (its
virtual size less what it holds already); that is reserved. A create needs room
for its whole disk, a save for the VM's memory. Kiln keeps ``KILN_DISK_FLOOR_MB``
free on top for its database and logs. Refused work is refused before anything
is made; a guest that writes until its disk is full gets "no space" inside,
from its own file system, while the host keeps its floor.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.services.errors import CapacityExhausted, OutOfSpace


@dataclass(frozen=True)
class DiskBudget:
    data_dir: Path
    floor_bytes: int
    # What the running VMs may still write (bytes).
    reserved: Callable[[], int]

    def left(self) -> int:
        """Bytes free for new work after the reservations and the floor."""
        existing = next(path for path in (self.data_dir, *self.data_dir.resolve().parents) if path.exists())
        free = shutil.disk_usage(existing).free
        return free - self.reserved() - self.floor_bytes

    def check_create(self, disk_bytes: int) -> None:
        left = self.left()
        if disk_bytes > left:
            raise CapacityExhausted(
                f"not enough disk: the VM's disk may grow to {disk_bytes >> 20} MiB, "
                f"{max(left, 0) >> 20} MiB are left after what running VMs may write"
            )

    def check_save(self, memory_bytes: int) -> None:
        left = self.left()
        if memory_bytes > left:
            raise OutOfSpace(
                f"not enough disk to save the VM: its memory takes up to {memory_bytes >> 20} MiB, "
                f"{max(left, 0) >> 20} MiB are left"
            )
