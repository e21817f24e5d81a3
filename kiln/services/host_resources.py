"""The ledger of host resources, kept in the store (``kiln.node.participant.Ledger``)."""

from __future__ import annotations

from kiln.node.participant import HostResource
from kiln.store.db import Database
from kiln.store.models import HostResourceRow
from kiln.store.repositories import HostResourceRepository


def _resource(row: HostResourceRow) -> HostResource:
    return HostResource(row.kind, row.name, row.vm_id, row.owner_id, dict(row.detail or {}))


class StoreLedger:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, *resources: HostResource) -> None:
        if not resources:
            return
        async with self._db.transaction() as session:
            repository = HostResourceRepository(session)
            for resource in resources:
                await repository.upsert_any_owner(
                    HostResourceRow(
                        kind=resource.kind,
                        name=resource.name,
                        vm_id=resource.vm_id,
                        owner_id=resource.owner_id,
                        detail=resource.detail,
                    )
                )

    async def forget(self, *resources: HostResource) -> None:
        if not resources:
            return
        async with self._db.transaction() as session:
            repository = HostResourceRepository(session)
            for resource in resources:
                await repository.delete_any_owner(resource.kind, resource.name)

    async def of_vm(self, vm_id: str) -> list[HostResource]:
        async with self._db.transaction() as session:
            return [_resource(row) for row in await HostResourceRepository(session).of_vm_any_owner(vm_id)]

    async def all(self) -> list[HostResource]:
        async with self._db.transaction() as session:
            return [_resource(row) for row in await HostResourceRepository(session).all_any_owner()]
