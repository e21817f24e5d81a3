"""Wire model of ``GET /v1/users/me/usage-breakdown`` (the SDK's ``get_usage_breakdown``;
its CLI reads ``period_start``, ``period_end``, ``total_days``, ``totals`` and
``daily_breakdown`` with ``date``, ``cost_dollars``, ``cpu_hours``, ``ram_gib_hours``)."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel


class UsageAmounts(BaseModel):
    cost_dollars: float
    # vCPU-hours and memory GiB-hours of running VMs (what they were given).
    cpu_hours: float
    ram_gib_hours: float
    # Disk GiB-hours of running and suspended VMs (what their disks may grow to,
    # and a suspended VM's saved memory).
    disk_gib_hours: float
    vcpu_seconds: float
    memory_gib_seconds: float
    disk_gib_seconds: float


class UsageDay(UsageAmounts):
    date: date


class UsageOfVm(UsageAmounts):
    vm_id: str
    session_id: str


class UsageBreakdown(BaseModel):
    period_start: date
    period_end: date
    total_days: int
    totals: UsageAmounts
    daily_breakdown: list[UsageDay]
    vms: list[UsageOfVm]
