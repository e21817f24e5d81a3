"""A ledger kept in memory: for processes with no store (the CLI's image
builds) and for unit tests. The server's ledger is the store's
(``kiln.services.host_resources``)."""

from __future__ import annotations

from kiln.node.participant import HostResource


class MemoryLedger:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], HostResource] = {}

    async def record(self, *resources: HostResource) -> None:
        for resource in resources:
            self._rows[(resource.kind, resource.name)] = resource

    async def forget(self, *resources: HostResource) -> None:
        for resource in resources:
            self._rows.pop((resource.kind, resource.name), None)

    async def of_vm(self, vm_id: str) -> list[HostResource]:
        return [row for row in self._rows.values() if row.vm_id == vm_id]

    async def all(self) -> list[HostResource]:
        return list(self._rows.values())
