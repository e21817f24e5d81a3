"""Admission: whether the host and the user's quota can take one more VM.

Counted against the host: every user's VMs that hold resources or a saved
state a resume needs (creating, running, suspending, suspended, resuming,
terminating), plus the node's own VMs (idle pool VMs, base-snapshot builds,
imports). Counted against a user: their own such VMs. A create or a clone
over a limit starts nothing: the check runs before anything is planned, and
again atomically with the insert (under ``lock``).

The host's memory limit is ``KILN_MAX_MEMORY_MB`` (or three quarters of the
host) times ``KILN_MEMORY_OVERCOMMIT``: VMs hold the guest RAM they touched,
not their size. What the host really has left is checked too
(``memory_pressure``: below ``KILN_MEMORY_FLOOR_MB`` nothing new starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.services.errors import CapacityExhausted, QuotaExceeded
from kiln.services.memory_pressure import MemoryFloor
from kiln.services.states import ADMITTED_STATUSES
from kiln.store.repositories import ResourceUsage, VmRepository


@dataclass(frozen=True)
class Quotas:
    vms: int
    vcpus: int
    memory_mb: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        return cls(
            vms=settings.quota_vms if settings.quota_vms is not None else settings.admission_max_vms,
            vcpus=settings.quota_vcpus if settings.quota_vcpus is not None else settings.admission_max_vcpus,
            memory_mb=(
                settings.quota_memory_mb if settings.quota_memory_mb is not None
                else int(settings.admission_max_memory_mb * settings.memory_overcommit)
            ),
        )  # fmt: skip


class Admission:
    def __init__(
        self, settings: Settings, node_usage: Callable[[], ResourceUsage], floor: MemoryFloor | None = None
    ) -> None:
        self._settings = settings
        self._node_usage = node_usage
        self._floor = floor or MemoryFloor(settings)
        self.quotas = Quotas.from_settings(settings)
        # Check-then-insert must not interleave between two creates.
        self.lock = asyncio.Lock()

    @property
    def host_memory_mb(self) -> int:
        """The memory the host admits VMs for: its limit times the overcommit ratio."""
        return int(self._settings.admission_max_memory_mb * self._settings.memory_overcommit)

    async def check(self, session: AsyncSession, owner_id: int, memory_mb: int, vcpus: int) -> None:
        """CapacityExhausted (host) or QuotaExceeded (user) if one more VM of this
        shape does not fit."""
        vms = VmRepository(session)
        every = await vms.usage_any_owner(ADMITTED_STATUSES)
        node = self._node_usage()
        # The host first: when a quota is the host's limit (the default), the
        # host's answer says more (503, the host is full, retry later).
        self._check_host(
            ResourceUsage(every.vms + node.vms, every.memory_mb + node.memory_mb, every.vcpus + node.vcpus),
            memory_mb,
            vcpus,
        )
        self._floor.check(memory_mb)
        self._check_quota(await vms.usage(owner_id, ADMITTED_STATUSES), memory_mb, vcpus)

    def _check_quota(self, usage: ResourceUsage, memory_mb: int, vcpus: int) -> None:
        quotas = self.quotas
        if usage.vms + 1 > quotas.vms:
            raise QuotaExceeded(f"quota vms: you have {usage.vms} of {quotas.vms} VMs (KILN_QUOTA_VMS)")
        if usage.memory_mb + memory_mb > quotas.memory_mb:
            raise QuotaExceeded(
                f"quota memory_mb: {memory_mb} MB asked, {quotas.memory_mb - usage.memory_mb} MB "
                f"left of {quotas.memory_mb} (KILN_QUOTA_MEMORY_MB)"
            )
        if usage.vcpus + vcpus > quotas.vcpus:
            raise QuotaExceeded(
                f"quota vcpus: {vcpus} asked, {quotas.vcpus - usage.vcpus} left of {quotas.vcpus} "
                "(KILN_QUOTA_VCPUS)"
            )

    def _check_host(self, usage: ResourceUsage, memory_mb: int, vcpus: int) -> None:
        settings = self._settings
        if usage.vms + 1 > settings.admission_max_vms:
            raise CapacityExhausted(f"the host runs its limit of {settings.admission_max_vms} VMs")
        if usage.memory_mb + memory_mb > self.host_memory_mb:
            raise CapacityExhausted(
                f"not enough memory: {memory_mb} MB asked, "
                f"{self.host_memory_mb - usage.memory_mb} MB free of {self.host_memory_mb} "
                "(KILN_MAX_MEMORY_MB times KILN_MEMORY_OVERCOMMIT)"
            )
        if usage.vcpus + vcpus > settings.admission_max_vcpus:
            raise CapacityExhausted(
                f"not enough vCPUs: {vcpus} asked, {settings.admission_max_vcpus - usage.vcpus} free"
            )
