"""``GET /v1/users/me/usage-breakdown``: the caller's usage per UTC day and per VM,
from the usage ledger (``kiln.services.usage``)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from kiln.api.deps import CurrentUser, Ledger
from kiln.api.errors import validation_error
from kiln.schemas.errors import ErrorMessage
from kiln.schemas.usage import UsageAmounts, UsageBreakdown, UsageDay, UsageOfVm
from kiln.services.usage import MAX_DAYS, Amounts, UsageService

router = APIRouter(prefix="/v1/users/me", tags=["users"], responses={401: {"model": ErrorMessage}})

PARAMETERS = frozenset({"days", "start_date", "end_date"})
DIGITS = 6


def amounts(usage: UsageService, of: Amounts) -> dict[str, Any]:
    return {
        "cost_dollars": round(usage.cost(of), DIGITS),
        "cpu_hours": round(of.cpu_hours, DIGITS),
        "ram_gib_hours": round(of.ram_gib_hours, DIGITS),
        "disk_gib_hours": round(of.disk_gib_hours, DIGITS),
        "vcpu_seconds": round(of.vcpu_seconds, 3),
        "memory_gib_seconds": round(of.memory_gib_seconds, 3),
        "disk_gib_seconds": round(of.disk_gib_seconds, 3),
    }


@router.get("/usage-breakdown", responses={422: {"description": "a period this server cannot show"}})
async def usage_breakdown(
    request: Request,
    user: CurrentUser,
    usage: Ledger,
    days: Annotated[int, Query(ge=1, le=365)] = 30,
    start_date: date | None = None,
    end_date: date | None = None,
) -> UsageBreakdown:
    for name in request.query_params:
        if name not in PARAMETERS:
            raise validation_error(loc=("query", name), msg=f"unknown parameter {name!r}")
    # days counts back from end_date (default today, UTC) when start_date is not given.
    end = end_date or datetime.now(UTC).date()
    start = start_date or end - timedelta(days=days - 1)
    if start > end:
        raise validation_error(loc=("query", "start_date"), msg="must not be after end_date")
    if (end - start).days + 1 > MAX_DAYS:
        raise validation_error(loc=("query", "start_date"), msg=f"a period is at most {MAX_DAYS} days")
    found = await usage.breakdown(user.id, start, end)
    return UsageBreakdown(
        period_start=found.start,
        period_end=found.end,
        total_days=len(found.days),
        totals=UsageAmounts(**amounts(usage, found.totals)),
        daily_breakdown=[UsageDay(date=day, **amounts(usage, of)) for day, of in found.days],
        vms=[UsageOfVm(vm_id=vm.vm_id, session_id=vm.session_id, **amounts(usage, vm.amounts)) for vm in found.vms],
    )
