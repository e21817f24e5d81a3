"""``request-logs``: the calls the egress proxy injected a vault's credentials into.

The egress daemon journals each call on the host (``kiln.vault.journal``);
``take`` moves what it journaled into the store: every few seconds, and before
a vault's log is listed, so a call shows up as soon as its answer went back.
Calls of a vault deleted meanwhile are dropped; a call read twice (a crash
between storing a file and removing it) is stored once (its id).

Each stored call is also a ``vault.credential_used`` event, written in the
transaction that stores it. The journal is the channel from the egress daemon
(a process of its own, with no database) to the server: a call is journaled
before its answer goes back to the guest, its file is removed only after the
commit, so a crash of either process neither loses a use nor records one twice.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from kiln.node.node import Node
from kiln.services.background import Periodic
from kiln.services.errors import NotFound
from kiln.services.events.record import record, vault_call_event
from kiln.store.db import Database
from kiln.store.models import VaultCall
from kiln.store.vault_repositories import VaultCallRepository, VaultRepository
from kiln.vault.journal import Call

log = logging.getLogger(__name__)

TAKE_INTERVAL_SECONDS = 5.0
MAX_LIMIT = 1000


class VaultCallLog:
    def __init__(self, db: Database, node: Node) -> None:
        self.db = db
        self.node = node
        self._lock = asyncio.Lock()  # one take at a time (a file is stored, then removed)
        self._takes = Periodic("vault-calls", self.take, TAKE_INTERVAL_SECONDS, wait_first=True)

    async def take(self) -> int:
        """Store what the daemon journaled; the number of calls stored."""
        networking = self.node.networking
        if networking is None:
            return 0
        stored = 0
        async with self._lock:
            for path, calls in await networking.take_calls():
                stored += await self._store(calls)
                await asyncio.to_thread(path.unlink, missing_ok=True)
        return stored

    async def recent(self, owner_id: int, vault_id: str, limit: int) -> list[VaultCall]:
        try:
            await self.take()
        except OSError as error:  # the log then lacks the newest calls, no more
            log.warning("vault calls could not be taken from the egress daemon: %s", error)
        async with self.db.transaction() as session:
            if await VaultRepository(session).get(owner_id, vault_id) is None:
                raise NotFound(f"vault {vault_id} not found")
            return await VaultCallRepository(session).list(owner_id, vault_id, max(1, min(limit, MAX_LIMIT)))

    async def _store(self, calls: list[Call]) -> int:
        if not calls:
            return 0
        async with self.db.transaction() as session:
            owners = await VaultRepository(session).owners_any_owner({call.vault_id for call in calls})
            repository = VaultCallRepository(session)
            known = await repository.known_ids_any_owner([call.id for call in calls])
            rows = [
                VaultCall(
                    id=call.id, owner_id=owners[call.vault_id], vault_id=call.vault_id, vm_id=call.vm_id,
                    service_id=call.service_id, credential_id=call.credential_id,
                    credential_name=call.credential_name, host=call.host, method=call.method, path=call.path,
                    status=call.status, error=call.error, at=datetime.fromtimestamp(call.at, UTC),
                )  # fmt: skip
                for call in {call.id: call for call in calls}.values()
                if call.vault_id in owners and call.id not in known
            ]
            await repository.add_all_any_owner(rows)
            # In the rows' transaction (the outbox): the journal file goes only after
            # the commit, and a call stored once is skipped by id, so each use is one event.
            for row in rows:
                await record(session, vault_call_event(row))
        return len(rows)

    def start(self) -> None:
        self._takes.start()

    async def stop(self) -> None:
        await self._takes.stop()
