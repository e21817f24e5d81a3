"""The machines this server runs: one registry, used by every service."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator

from kiln.runtime.driver import Machine


class MachineRegistry:
    """The ``Machine`` of every VM this process started or adopted, and one
    save lock per VM (a VM is saved by one operation at a time, and taken down
    only once a save in progress is done)."""

    def __init__(self) -> None:
        self._machines: dict[str, Machine] = {}
        self._save_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def get(self, vm_id: str) -> Machine | None:
        return self._machines.get(vm_id)

    def add(self, machine: Machine) -> None:
        self._machines[machine.vm_id] = machine

    def pop(self, vm_id: str) -> Machine | None:
        return self._machines.pop(vm_id, None)

    def __contains__(self, vm_id: object) -> bool:
        return vm_id in self._machines

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._machines))

    def items(self) -> list[tuple[str, Machine]]:
        return list(self._machines.items())

    def save_lock(self, vm_id: str) -> asyncio.Lock:
        lock = self._save_locks.get(vm_id)
        if lock is None:
            lock = asyncio.Lock()
            self._save_locks[vm_id] = lock
        return lock

    def saving(self, vm_id: str) -> bool:
        lock = self._save_locks.get(vm_id)
        return lock is not None and lock.locked()
