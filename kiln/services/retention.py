"""Keeping the store to its retention: rows of things that ended long ago go.

- **Design: one hourly pass, owner-blind, per table.** *What:* events older
  than ``KILN_EVENTS_RETENTION_DAYS``; webhook deliveries that ended
  (succeeded or failed), terminated and failed VMs (with their shares),
  finished async tasks, and sessions left without a VM, older than
  ``KILN_ROWS_RETENTION_DAYS``. *Why:* every one of them only grows; a
  pending delivery, a live VM and a running task are never touched, so a
  pass can run at any time, on any of several servers sharing a database.
- Usage intervals are history (the breakdown reads them) and stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from kiln.services.background import Periodic
from kiln.services.execution import TaskStatus
from kiln.services.states import ENDED_STATUSES
from kiln.store.db import Database
from kiln.store.events import EventRepository
from kiln.store.models import utc_now
from kiln.store.retention import RetentionRepository
from kiln.store.webhooks import WebhookRepository

log = logging.getLogger(__name__)

PASS_INTERVAL_SECONDS = 3600.0
FINISHED_TASK_STATUSES = (TaskStatus.COMPLETE, TaskStatus.FAILED)


@dataclass(frozen=True)
class Pruned:
    events: int = 0
    deliveries: int = 0
    vms: int = 0
    tasks: int = 0
    sessions: int = 0

    def total(self) -> int:
        return self.events + self.deliveries + self.vms + self.tasks + self.sessions


class Retention:
    def __init__(self, db: Database, events_days: int, rows_days: int) -> None:
        self._db = db
        self._events = timedelta(days=events_days)
        self._rows = timedelta(days=rows_days)
        self._passes = Periodic("retention", self.prune, PASS_INTERVAL_SECONDS)

    async def prune(self) -> Pruned:
        """One pass; what went, by kind."""
        now = utc_now()
        events_cutoff, rows_cutoff = now - self._events, now - self._rows
        async with self._db.transaction() as session:
            rows = RetentionRepository(session)
            events = await EventRepository(session).delete_older_than_any_owner(events_cutoff)
            deliveries = await WebhookRepository(session).delete_finished_before_any_owner(rows_cutoff)
            tasks = await rows.delete_tasks_finished_before_any_owner(FINISHED_TASK_STATUSES, rows_cutoff)
            vms = await rows.delete_vms_ended_before_any_owner(ENDED_STATUSES, rows_cutoff)
            # After the VMs: a session goes once its last VM did.
            sessions = await rows.delete_sessions_without_vms_any_owner(rows_cutoff)
        pruned = Pruned(events, deliveries, vms, tasks, sessions)
        if pruned.total():
            log.info("retention removed %s", pruned)
        return pruned

    def start(self) -> None:
        self._passes.start()

    async def stop(self) -> None:
        await self._passes.stop()
