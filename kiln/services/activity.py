"""When each VM was last used: what ``auto_suspend`` measures idleness by.

Touched by every guest call (``VmService.running_machine``: exec, files,
terminals), by a VM coming up, and by the share router's reports of traffic.
In memory: after a server restart every VM counts as used at the start.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Activity:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._last: dict[str, float] = {}

    def touch(self, *vm_ids: str) -> None:
        now = self._clock()
        for vm_id in vm_ids:
            self._last[vm_id] = now

    def idle_seconds(self, vm_id: str) -> float:
        return self._clock() - self._last.get(vm_id, self._started)

    def forget(self, vm_id: str) -> None:
        self._last.pop(vm_id, None)
