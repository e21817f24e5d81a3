"""``CallLog``: an ``api.call`` event for every mutating API request, written in batches.

- **Design: a record of the call, not of a change.** *What:* POST, PUT, PATCH
  and DELETE requests (refused ones too: a 401, a 404, a 422) become
  ``api.call`` events with the method, the route template (never the query or
  body: they may carry secrets), the status and the time taken; the API layer
  reports them after the answer, and this log writes what gathered in one
  transaction every second (and at the server's stop). *Why:* a commit per
  request would cost every ``/execute`` a write to the database; what the
  call changed is recorded, in its own transaction, by the service that made
  the change. A crash may lose up to a second of call records, never an event
  of a change.
"""

from __future__ import annotations

from kiln.services.background import Periodic
from kiln.services.events.record import NewEvent, record
from kiln.store.db import Database

FLUSH_SECONDS = 1.0
# Past this many waiting records, new ones are dropped (and counted) until a flush.
MAX_PENDING = 10_000


class CallLog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[NewEvent] = []
        self.dropped = 0
        self._flushes = Periodic("api-call-log", self.flush, FLUSH_SECONDS, wait_first=True)

    def note(self, event: NewEvent) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(event)

    async def flush(self) -> int:
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        async with self._db.transaction() as session:
            for event in batch:
                await record(session, event)
        return len(batch)

    def start(self) -> None:
        self._flushes.start()

    async def stop(self) -> None:
        await self._flushes.stop()
        await self.flush()
