"""``HostStats``: the host's state as the metrics show it, read at each scrape."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.node.pool import WarmPool
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


class HostStats:
    def __init__(self, db: Database, pool: WarmPool | None) -> None:
        self._db = db
        self._pool = pool

    async def snapshot(self) -> HostSnapshot:
        async with self._db.transaction() as session:
            by_status = await vms_by_status_any_owner(session)
            usage = await VmRepository(session).usage_any_owner(RESOURCE_HOLDING_STATUSES)
            deliveries = await deliveries_by_status_any_owner(session)
        return HostSnapshot(
            vms_by_status=by_status,
            vm_memory_mb=usage.memory_mb,
            vm_vcpus=usage.vcpus,
            pool_idle=self._pool.idle_count if self._pool is not None else 0,
            pool_size=self._pool.size if self._pool is not None else 0,
            deliveries_by_status=deliveries,
        )
