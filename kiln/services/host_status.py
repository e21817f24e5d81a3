"""What the host holds now, for the dashboard's host page: the VMs, memory and
vCPUs in use against the admission limits, the caller's share against their
quota, and the warm pool's fill. Read-only; counted as admission counts."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import Settings
from kiln.services.admission import Quotas
from kiln.services.states import ADMITTED_STATUSES
from kiln.services.vms import VmService
from kiln.store.repositories import ResourceUsage, VmRepository


@dataclass(frozen=True)
class HostCapacity:
    in_use: ResourceUsage
    limits: ResourceUsage
    mine: ResourceUsage
    quotas: Quotas
    pool_idle: int
    pool_size: int


class HostStatus:
    def __init__(self, vms: VmService, settings: Settings) -> None:
        self._vms = vms
        self._limits = ResourceUsage(
            settings.admission_max_vms, vms.admission.host_memory_mb, settings.admission_max_vcpus
        )

    async def capacity(self, owner_id: int) -> HostCapacity:
        async with self._vms.db.transaction() as session:
            repository = VmRepository(session)
            every = await repository.usage_any_owner(ADMITTED_STATUSES)
            mine = await repository.usage(owner_id, ADMITTED_STATUSES)
        node_vms, node_memory, node_vcpus = self._vms.node.transient_usage()
        pool = self._vms.pool
        return HostCapacity(
            in_use=ResourceUsage(every.vms + node_vms, every.memory_mb + node_memory, every.vcpus + node_vcpus),
            limits=self._limits,
            mine=mine,
            quotas=self._vms.admission.quotas,
            pool_idle=pool.idle_count if pool is not None else 0,
            pool_size=pool.size if pool is not None else 0,
        )
