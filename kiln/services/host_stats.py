"""``HostStats``: the host's state as the metrics show it, read at each scrape."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kiln.node.node import Node
from kiln.node.pool import WarmPool
from kiln.services.sessions import read_process_usage
from kiln.services.states import RESOURCE_HOLDING_STATUSES
from kiln.store.db import Database
from kiln.store.repositories import VmRepository
from kiln.store.stats import deliveries_by_status_any_owner, vms_by_status_any_owner


@dataclass(frozen=True)
class HostSnapshot:
    vms_by_status: dict[str, int]
    # What the VMs with a process (or one being made or removed) were given.
    vm_memory_mb: int
    vm_vcpus: int
    pool_idle: int
    pool_size: int
    deliveries_by_status: dict[str, int]
    # What the QEMU processes of this node (users' VMs, the pool, builds, helpers)
    # use now: CPU time so far (its rate is the CPU in use) and resident memory.
    qemu_processes: int = 0
    qemu_cpu_seconds: float = 0.0
    qemu_resident_mb: float = 0.0


class HostStats:
    def __init__(self, db: Database, node: Node, pool: WarmPool | None) -> None:
        self._db = db
        self._node = node
        self._pool = pool

    def _qemu_usage(self) -> tuple[int, float, float]:
        """(processes, CPU seconds, resident MiB) of the node's QEMU processes (reads /proc)."""
        found = [read_process_usage(machine.pid) for _, machine in self._node.machines.items()]
        alive = [usage for usage in found if usage is not None]
        return len(alive), sum(u.cpu_seconds for u in alive), sum(u.rss_mb for u in alive)

    async def snapshot(self) -> HostSnapshot:
        async with self._db.transaction() as session:
            by_status = await vms_by_status_any_owner(session)
            usage = await VmRepository(session).usage_any_owner(RESOURCE_HOLDING_STATUSES)
            deliveries = await deliveries_by_status_any_owner(session)
        processes, cpu_seconds, resident_mb = await asyncio.to_thread(self._qemu_usage)
        return HostSnapshot(
            vms_by_status=by_status,
            vm_memory_mb=usage.memory_mb,
            vm_vcpus=usage.vcpus,
            pool_idle=self._pool.idle_count if self._pool is not None else 0,
            pool_size=self._pool.size if self._pool is not None else 0,
            deliveries_by_status=deliveries,
            qemu_processes=processes,
            qemu_cpu_seconds=cpu_seconds,
            qemu_resident_mb=resident_mb,
        )
