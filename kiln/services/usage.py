"""The usage ledger: what each VM used, from the stretches of time it ran.

- **Design: intervals written at the transition.** *What:* entering
  ``running`` opens a ``usage_intervals`` row (the VM's vCPUs and memory),
  leaving it closes the open one, in the transaction of the transition
  (``ledger_transition``, called by ``VmService.set_status``). *Why:* a
  counter kept in memory would be lost at a restart, and one sampled from
  ``/proc`` would miss VMs that lived between samples. A VM adopted after a
  restart was running all along: its interval stays open.
- **What is counted:** vCPU-seconds and memory GiB-seconds of running VMs,
  and disk GiB-seconds of running and suspended ones: what a VM was given,
  not what it used (the host reserves it either way). A VM's disk is what it
  may grow to (its image's rootfs, as the disk budget reserves it); a
  suspended VM holds that disk and its saved memory (``memory_mb``) and no
  CPU or memory. Entering ``suspended`` opens an interval of its own, so the
  same rows and the same transitions carry all three.
- **Cost:** ``KILN_USAGE_DOLLARS_PER_VCPU_HOUR``,
  ``KILN_USAGE_DOLLARS_PER_GIB_HOUR`` and
  ``KILN_USAGE_DOLLARS_PER_DISK_GIB_HOUR`` (0 by default: a self-hosted
  server has no prices, and the SDK's CLI prints $0.00).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.services.states import VmStatus as S
from kiln.store.db import Database
from kiln.store.models import UsageInterval, Vm, utc_now
from kiln.store.usage import UsageRepository

MAX_DAYS = 366


# The statuses an interval is open in (between them a VM is being saved or
# resumed, for seconds: not counted).
COUNTED = frozenset({S.RUNNING, S.SUSPENDED})


async def ledger_transition(session: AsyncSession, vm: Vm, current: str, target: str, disk_mb: int) -> None:
    """``disk_mb``: what the VM's disk may grow to."""
    if current == target:
        return
    ledger = UsageRepository(session)
    now = utc_now()
    if current in COUNTED:
        await ledger.close_any_owner(vm.id, now)
    if target in COUNTED:
        running = target == S.RUNNING
        await ledger.open_any_owner(
            UsageInterval(
                owner_id=vm.owner_id,
                vm_id=vm.id,
                session_id=vm.session_id,
                vcpu_count=vm.vcpu_count if running else 0,
                memory_mb=vm.memory_mb if running else 0,
                # A suspended VM's saved memory is on the disk too.
                disk_mb=disk_mb if running else disk_mb + vm.memory_mb,
                started_at=now,
            )
        )


@dataclass
class Amounts:
    vcpu_seconds: float = 0.0
    memory_gib_seconds: float = 0.0
    disk_gib_seconds: float = 0.0

    def add(self, interval: UsageInterval, seconds: float) -> None:
        self.vcpu_seconds += interval.vcpu_count * seconds
        self.memory_gib_seconds += interval.memory_mb / 1024 * seconds
        self.disk_gib_seconds += interval.disk_mb / 1024 * seconds

    @property
    def cpu_hours(self) -> float:
        return self.vcpu_seconds / 3600

    @property
    def ram_gib_hours(self) -> float:
        return self.memory_gib_seconds / 3600

    @property
    def disk_gib_hours(self) -> float:
        return self.disk_gib_seconds / 3600


@dataclass(frozen=True)
class Prices:
    """Dollars per vCPU-hour, memory GiB-hour and disk GiB-hour."""

    per_vcpu_hour: float = 0.0
    per_gib_hour: float = 0.0
    per_disk_gib_hour: float = 0.0


@dataclass
class VmUsage:
    vm_id: str
    session_id: str
    amounts: Amounts = field(default_factory=Amounts)


@dataclass(frozen=True)
class Breakdown:
    start: date
    end: date
    totals: Amounts
    days: list[tuple[date, Amounts]]
    vms: list[VmUsage]


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), UTC)
    return start, start + timedelta(days=1)


class UsageService:
    def __init__(self, db: Database, prices: Prices) -> None:
        self._db = db
        self.prices = prices

    def cost(self, amounts: Amounts) -> float:
        prices = self.prices
        return (
            amounts.cpu_hours * prices.per_vcpu_hour
            + amounts.ram_gib_hours * prices.per_gib_hour
            + amounts.disk_gib_hours * prices.per_disk_gib_hour
        )

    async def breakdown(self, owner_id: int, start: date, end: date) -> Breakdown:
        """Usage per UTC day from ``start`` to ``end`` (both included), and per VM."""
        period_start, _ = day_bounds(start)
        _, period_end = day_bounds(end)
        now = utc_now()
        async with self._db.transaction() as session:
            intervals = await UsageRepository(session).overlapping(owner_id, period_start, period_end)
        days = [(start + timedelta(days=n), Amounts()) for n in range((end - start).days + 1)]
        totals = Amounts()
        vms: dict[str, VmUsage] = {}
        for interval in intervals:
            began = max(interval.started_at, period_start)
            ended = min(interval.ended_at or now, period_end, now)
            if ended <= began:
                continue
            vm = vms.setdefault(interval.vm_id, VmUsage(interval.vm_id, interval.session_id))
            for day, amounts in days:
                low, high = day_bounds(day)
                seconds = (min(ended, high) - max(began, low)).total_seconds()
                if seconds > 0:
                    amounts.add(interval, seconds)
                    totals.add(interval, seconds)
                    vm.amounts.add(interval, seconds)
        return Breakdown(start, end, totals, days, list(vms.values()))

    async def of_session(self, owner_id: int, session_id: str) -> Amounts:
        """Everything a session's VMs ran, to now."""
        now = utc_now()
        async with self._db.transaction() as session:
            intervals = await UsageRepository(session).of_session(owner_id, session_id)
        amounts = Amounts()
        for interval in intervals:
            amounts.add(interval, max(((interval.ended_at or now) - interval.started_at).total_seconds(), 0.0))
        return amounts
