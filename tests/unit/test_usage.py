"""The usage ledger and GET /v1/users/me/usage-breakdown (fake runtime): intervals
opened and closed by the VM's transitions, split per UTC day, per VM and per
user, in the SDK's shape; bad periods refused by name."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from unit.harness import AppRunner, add_user, key_headers

from kiln.config import Settings
from kiln.services.usage import ledger_transition
from kiln.store.db import Database
from kiln.store.models import UsageInterval, Vm
from kiln.store.repositories import UserRepository
from kiln.store.usage import UsageRepository


async def intervals_of(settings: Settings, vm_id: str) -> list[UsageInterval]:
    db = Database(settings.database)
    try:
        async with db.transaction() as session:
            return [
                row
                for row in await UsageRepository(session).overlapping(*(await _admin_and_everything(session)))
                if row.vm_id == vm_id
            ]
    finally:
        await db.close()


async def _admin_and_everything(session) -> tuple[int, datetime, datetime]:  # type: ignore[no-untyped-def]
    admin = await UserRepository(session).by_username("admin")
    assert admin is not None
    return admin.id, datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)


async def test_transitions_open_and_close_intervals(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        vm_id = (await client.post("/v1/vms", json={"vcpu_count": 1, "memory_mb": 256}, headers=auth)).json()["vm_id"]
        [running] = await intervals_of(settings, vm_id)
        assert (running.vcpu_count, running.memory_mb, running.ended_at) == (1, 256, None)
        # A suspend that fails (the fake cannot save) leaves and re-enters running: two intervals.
        await client.post(f"/v1/vms/{vm_id}/suspend", headers=auth)
        await client.delete(f"/v1/vms/{vm_id}", headers=auth)
        rows = await intervals_of(settings, vm_id)
        assert len(rows) == 2 and all(row.ended_at is not None for row in rows)
        assert rows[0].ended_at is not None and rows[0].ended_at <= rows[1].started_at


async def test_the_breakdown_splits_usage_per_day_and_vm_in_the_sdks_shape(
    run_app: AppRunner, admin_key: Callable[[], str], settings: Settings
) -> None:
    async with run_app() as client:
        key = admin_key()
        alice = await add_user(settings, "alice")
        db = Database(settings.database)
        async with db.transaction() as session:
            admin_id = (await _admin_and_everything(session))[0]
            # Two hours across midnight, 2 vCPUs and 1 GiB: one hour on each day.
            await UsageRepository(session).open_any_owner(
                UsageInterval(
                    owner_id=admin_id,
                    vm_id="vm-a",
                    session_id="s-a",
                    vcpu_count=2,
                    memory_mb=1024,
                    disk_mb=2048,
                    started_at=datetime(2026, 11, 10, 23, tzinfo=UTC),
                    ended_at=datetime(2026, 11, 11, 1, tzinfo=UTC),
                )
            )
        await db.close()
        params = {"start_date": "2026-11-09", "end_date": "2026-11-11", "days": 30}
        answer = await client.get("/v1/users/me/usage-breakdown", params=params, headers=key_headers(key))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["period_start"], body["period_end"], body["total_days"]) == ("2026-11-09", "2026-11-11", 3)
        assert body["totals"]["cpu_hours"] == 4.0 and body["totals"]["ram_gib_hours"] == 2.0
        assert body["totals"]["disk_gib_hours"] == 4.0 and body["totals"]["disk_gib_seconds"] == 4 * 3600.0
        assert body["totals"]["cost_dollars"] == 0.0
        assert [
            (d["date"], d["cpu_hours"], d["ram_gib_hours"], d["disk_gib_hours"]) for d in body["daily_breakdown"]
        ] == [
            ("2026-11-09", 0.0, 0.0, 0.0),
            ("2026-11-10", 2.0, 1.0, 2.0),
            ("2026-11-11", 2.0, 1.0, 2.0),
        ]
        assert [(vm["vm_id"], vm["vcpu_seconds"]) for vm in body["vms"]] == [("vm-a", 4 * 3600.0)]

        theirs = await client.get("/v1/users/me/usage-breakdown", params=params, headers=key_headers(alice))
        assert theirs.json()["totals"]["cpu_hours"] == 0.0 and theirs.json()["vms"] == []


async def test_a_suspended_vm_counts_its_disk_and_saved_memory_but_no_cpu(db: Database) -> None:
    async with db.transaction() as session:
        owner = (await UserRepository(session).add("u", None)).id
        vm = Vm(id="vm-s", owner_id=owner, session_id="s", vcpu_count=2, memory_mb=512)
        for current, target in (
            ("creating", "running"),
            ("running", "suspending"),
            ("suspending", "suspended"),
            ("suspended", "resuming"),
            ("resuming", "running"),
            ("running", "terminating"),
        ):
            await ledger_transition(session, vm, current, target, disk_mb=1024)
        rows = await UsageRepository(session).of_session(owner, "s")
    shapes = [(r.vcpu_count, r.memory_mb, r.disk_mb) for r in rows]
    assert shapes == [(2, 512, 1024), (0, 0, 1024 + 512), (2, 512, 1024)]
    assert all(row.ended_at is not None for row in rows)


async def test_bad_periods_are_refused_by_name(run_app: AppRunner, admin_key: Callable[[], str]) -> None:
    async with run_app() as client:
        auth = key_headers(admin_key())
        for params, loc in (
            ({"days": 0}, ["query", "days"]),
            ({"days": 366}, ["query", "days"]),
            ({"start_date": "2026-13-01"}, ["query", "start_date"]),
            ({"start_date": "2026-11-02", "end_date": "2026-11-01"}, ["query", "start_date"]),
            ({"start_date": "2020-01-01", "end_date": "2026-01-01"}, ["query", "start_date"]),
            ({"month": "11"}, ["query", "month"]),
        ):
            answer = await client.get("/v1/users/me/usage-breakdown", params=params, headers=auth)
            assert answer.status_code == 422, (params, answer.text)
            assert answer.json()["detail"][0]["loc"] == loc, (params, answer.text)
        default = (await client.get("/v1/users/me/usage-breakdown", headers=auth)).json()
        assert default["total_days"] == 30 and len(default["daily_breakdown"]) == 30
