"""What Kiln does when the host runs short of memory: refuse new VMs first, then
suspend the idlest, never leave it to the kernel's OOM killer.

Admission counts each VM at its whole memory size (times the operator's
``KILN_MEMORY_OVERCOMMIT``), but what a VM really holds is the guest RAM it has
touched: an idle restored VM holds a fraction of its size, a busy one all of
it. So the host's real state is watched too, by the kernel's own estimate of
what can be had without swapping (``MemAvailable`` in ``/proc/meminfo``):

- below ``KILN_MEMORY_FLOOR_MB``, creates and clones are refused (503,
  saying how much is available and what the floor is); running VMs go on;
- below ``KILN_MEMORY_RECLAIM_FLOOR_MB``, ``MemoryReliever`` suspends the running
  VM idle the longest (its RAM goes to its saved state on disk, its QEMU exits),
  one per pass, until the host is above that floor again (``memory_relief``).

Resumes are not refused: a suspended VM is counted by admission already, and
the one just resumed is the least idle, so the reliever takes others first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiln.config import Settings
from kiln.services.errors import CapacityExhausted

MEMINFO = Path("/proc/meminfo")


def available_mb(meminfo: Path = MEMINFO) -> int:
    """The kernel's estimate of memory available to new work, in MiB."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"{meminfo} has no MemAvailable line")


class MemoryFloor:
    """The admission side: ``check`` raises CapacityExhausted below the floor."""

    def __init__(self, settings: Settings, available: Callable[[], int] = available_mb) -> None:
        self.floor_mb = settings.memory_floor_mb
        self._available = available

    def check(self, memory_mb: int) -> None:
        left = self._available()
        if left < self.floor_mb:
            raise CapacityExhausted(
                f"the host is short of memory: {left} MB available, below the floor of "
                f"{self.floor_mb} MB (KILN_MEMORY_FLOOR_MB) that new VMs must leave; "
                f"{memory_mb} MB asked"
            )
