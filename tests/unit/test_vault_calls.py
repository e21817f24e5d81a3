"""The egress daemon's journal of injected calls, filed into the store (SQLite, and
PostgreSQL when KILN_TEST_POSTGRES_URL is set): once each, under its vault."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from kiln.node.node import Node
from kiln.services.errors import NotFound
from kiln.services.vault_calls import VaultCallLog
from kiln.store.db import Database
from kiln.store.events import EventFilter, EventRepository
from kiln.store.models import Vault
from kiln.store.repositories import UserRepository
from kiln.store.vault_repositories import VaultRepository
from kiln.vault.journal import Call, CallJournal


class DaemonJournal:
    """The node's side as the daemon does it: rotate, then hand over every taken file."""

    def __init__(self, journal: CallJournal) -> None:
        self.journal = journal

    async def take_calls(self) -> list[tuple[Path, list[Call]]]:
        self.journal.rotate()
        return [(path, CallJournal.read(path)) for path in self.journal.taken()]


def call(vault_id: str, path: str) -> Call:
    return Call.new(
        vm_id="vm-1", vault_id=vault_id, service_id="svc_1", credential_id="cred_1", credential_name="KEY",
        host="api.echo.test", method="POST", path=path, status=201,
    )  # fmt: skip


async def test_calls_are_filed_once_under_their_vault(store: Database, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    async with store.transaction() as session:
        owner = (await UserRepository(session).add("owner", None)).id
        stranger = (await UserRepository(session).add("stranger", None)).id
        for vault_id in ("vault_kept", "vault_gone"):
            await VaultRepository(session).add(
                Vault(id=vault_id, owner_id=owner, name=vault_id, created_at=now, updated_at=now)
            )
    journal = CallJournal(tmp_path)
    log = VaultCallLog(store, cast(Node, SimpleNamespace(networking=DaemonJournal(journal))))
    first, second = call("vault_kept", "/v1/a"), call("vault_kept", "/v1/b")
    for made in (first, second, call("vault_gone", "/v1/c")):
        journal.append(made)
    async with store.transaction() as session:
        gone = await VaultRepository(session).get(owner, "vault_gone")
        assert gone is not None
        await VaultRepository(session).delete(gone)

    assert await log.take() == 2  # the deleted vault's call is dropped
    assert journal.taken() == []  # its file is gone once stored
    # A file read twice (a crash between storing and removing it) adds nothing twice.
    journal.append(first)
    assert await log.take() == 0

    listed = await log.recent(owner, "vault_kept", 10)
    assert [c.path for c in listed] == ["/v1/b", "/v1/a"]  # newest first
    assert (listed[0].status, listed[0].credential_name, listed[0].vm_id) == (201, "KEY", "vm-1")
    assert [c.path for c in await log.recent(owner, "vault_kept", 1)] == ["/v1/b"]
    with pytest.raises(NotFound):
        await log.recent(stranger, "vault_kept", 10)

    # One vault.credential_used event per stored call, in its transaction: none for the
    # dropped call, none for the one read twice; the credential's name, never its value.
    async with store.transaction() as session:
        events = await EventRepository(session).page(owner, EventFilter(event_type="vault.credential_used"), None, 10)
    assert sorted(e.payload["path"] for e in events) == ["/v1/a", "/v1/b"]
    assert {(e.vm_id, e.resource_id, e.status, e.event_group) for e in events} == {
        ("vm-1", "vault_kept", "success", "vault")
    }
    assert events[0].payload["credential_name"] == "KEY" and events[0].payload["status_code"] == 201
