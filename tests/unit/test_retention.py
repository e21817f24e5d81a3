"""The retention pass against a real database (SQLite, and PostgreSQL when
KILN_TEST_POSTGRES_URL names one): events past their retention, and rows of
things that ended long ago (VMs, async tasks, webhook deliveries, sessions),
go; what is live, owed or recent stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kiln.services.events.record import NewEvent, record
from kiln.services.retention import Pruned, Retention
from kiln.services.webhooks.fanout import new_delivery
from kiln.store.db import Database
from kiln.store.events import EventRepository
from kiln.store.models import ExecutionTask, SandboxSession, Share, Vm, WebhookEndpoint
from kiln.store.repositories import ExecutionTaskRepository, SessionRepository, UserRepository, VmRepository
from kiln.store.webhooks import WebhookRepository

LONG_AGO = datetime.now(UTC) - timedelta(days=8)
RECENTLY = datetime.now(UTC) - timedelta(days=1)


def a_vm(owner_id: int, vm_id: str, status: str, ended: datetime | None) -> Vm:
    return Vm(
        id=vm_id, owner_id=owner_id, session_id=f"s-{vm_id}", status=status, vcpu_count=1, memory_mb=256,
        image_variant="default", labels={}, env_status="none", vault_ids=[], snapshot_on_terminate=False,
        auto_suspend=False, auto_resume=False, expires_at=LONG_AGO, created_at=LONG_AGO,
        updated_at=ended or RECENTLY, terminated_at=ended if status == "terminated" else None,
    )  # fmt: skip


def a_task(owner_id: int, task_id: str, status: str, completed: datetime | None) -> ExecutionTask:
    return ExecutionTask(
        id=task_id, owner_id=owner_id, session_id="s", vm_id="vm-x", language="bash", command="true",
        status=status, created_at=LONG_AGO, completed_at=completed,
    )  # fmt: skip


async def test_rows_that_ended_before_the_retention_go_and_the_rest_stays(store: Database) -> None:
    async with store.transaction() as session:
        owner = (await UserRepository(session).add("old", None)).id
        vms = VmRepository(session)
        for vm_id, status, ended in (
            ("vm-old-terminated", "terminated", LONG_AGO),
            ("vm-old-failed", "failed", LONG_AGO),
            ("vm-new-terminated", "terminated", RECENTLY),
            ("vm-old-running", "running", None),
        ):
            session.add(SandboxSession(owner_id=owner, id=f"s-{vm_id}", created_at=LONG_AGO))
            await vms.add(a_vm(owner, vm_id, status, ended))
        session.add(
            Share(id="shr-old", owner_id=owner, vm_id="vm-old-terminated", port=80, is_public=True, status="ended")
        )
        tasks = ExecutionTaskRepository(session)
        for task_id, status, completed in (
            ("task-old", "complete", LONG_AGO),
            ("task-old-failed", "failed", LONG_AGO),
            ("task-new", "complete", RECENTLY),
            ("task-running", "running", None),
        ):
            await tasks.add(a_task(owner, task_id, status, completed))

    assert await Retention(store, events_days=7, rows_days=7).prune() == Pruned(vms=2, tasks=2, sessions=2)

    async with store.transaction() as session:
        vms = VmRepository(session)
        assert {vm_id for vm_id in ("vm-old-terminated", "vm-old-failed", "vm-new-terminated", "vm-old-running")
                if await vms.get_any_owner(vm_id) is not None} == {"vm-new-terminated", "vm-old-running"}  # fmt: skip
        assert await session.get(Share, "shr-old") is None
        sessions = SessionRepository(session)
        assert await sessions.get(owner, "s-vm-old-terminated") is None
        assert await sessions.get(owner, "s-vm-old-running") is not None
        tasks = ExecutionTaskRepository(session)
        kept = [task_id for task_id in ("task-old", "task-new", "task-running") if await tasks.get(owner, task_id)]
        assert kept == ["task-new", "task-running"]


async def test_events_and_ended_deliveries_older_than_their_retention_go(store: Database) -> None:
    async with store.transaction() as session:
        user = await UserRepository(session).add("old", None)
        old = await record(session, NewEvent("vm.created", user.id))
        old.created_at = LONG_AGO
        new = await record(session, NewEvent("vm.running", user.id))
        endpoint = await WebhookRepository(session).add_endpoint(
            WebhookEndpoint(
                owner_id=user.id, url="https://x.test/", event_patterns=["*"], timeout_seconds=1, max_retries=0,
                enabled=True, secret="sealed", secret_hint="whsec_…abcd", created_at=LONG_AGO, updated_at=LONG_AGO,
            )
        )  # fmt: skip
        done, owed = new_delivery(endpoint, old), new_delivery(endpoint, old)
        done.status, done.created_at, owed.created_at = "succeeded", LONG_AGO, LONG_AGO
        for delivery in (done, owed):
            await WebhookRepository(session).add_delivery(delivery)
    # Events are kept for 7 days here, other rows 30: only the old event goes at first.
    assert await Retention(store, events_days=7, rows_days=30).prune() == Pruned(events=1)
    assert await Retention(store, events_days=7, rows_days=7).prune() == Pruned(deliveries=1)
    async with store.transaction() as session:
        events = EventRepository(session)
        assert await events.get_any_owner(old.id) is None
        assert await events.get_any_owner(new.id) is not None
        webhooks = WebhookRepository(session)
        assert await webhooks.delivery_any_owner(done.id) is None
        assert await webhooks.delivery_any_owner(owed.id) is not None  # still owed: never pruned
