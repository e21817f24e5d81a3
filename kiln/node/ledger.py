"""A ledger kept in memory: for processes with no store (the CLI's image
builds) and for unit tests. The server's ledger is the store's
(``kiln.services.host_resources``)."""

from __future__ import annotations

from kiln.node.participant import HostResource


class MemoryLedger:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], HostResource] = {}
        # ("record" | "forget", kind, name) in order: tests check that a
        # resource is recorded before it is made.
        self.events: list[tuple[str, str, str]] = []

    async def record(self, *resources: HostResource) -> None:
        for resource in resources:
            self.rows[(resource.kind, resource.name)] = resource
            self.events.append(("record", resource.kind, resource.name))

    async def forget(self, *resources: HostResource) -> None:
        for resource in resources:
            self.rows.pop((resource.kind, resource.name), None)
            self.events.append(("forget", resource.kind, resource.name))

    async def of_vm(self, vm_id: str) -> list[HostResource]:
        return [row for row in self.rows.values() if row.vm_id == vm_id]

    async def all(self) -> list[HostResource]:
        return list(self.rows.values())
