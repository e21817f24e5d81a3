"""Queries of the shares table, and the share router's one lookup.

``ShareRepository`` serves the share service (every method takes ``owner_id``
but the router's ``route_any_owner``, which the router runs for each request
with a read-only connection: the share, its VM, and where the host reaches it).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import HostResourceRow, Share, Vm


@dataclass(frozen=True)
class ShareRoute:
    """What the router needs to serve one request to a share."""

    share_id: str
    owner_id: int
    port: int
    is_public: bool
    status: str
    vm_id: str
    vm_status: str
    auto_resume: bool
    # The host resources of the VM whose detail names an address (its network lease).
    outside_address: str | None


class ShareRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, share: Share) -> Share:
        self.session.add(share)
        await self.session.flush()
        return share

    async def get(self, owner_id: int, share_id: str) -> Share | None:
        return await self.session.scalar(select(Share).where(Share.owner_id == owner_id, Share.id == share_id))

    async def list(self, owner_id: int, vm_id: str | None = None) -> builtins.list[Share]:
        query = select(Share).where(Share.owner_id == owner_id)
        if vm_id is not None:
            query = query.where(Share.vm_id == vm_id)
        return list(await self.session.scalars(query.order_by(Share.created_at, Share.id)))

    async def delete(self, owner_id: int, share_id: str) -> bool:
        result = await self.session.execute(delete(Share).where(Share.owner_id == owner_id, Share.id == share_id))
        return bool(getattr(result, "rowcount", 0))

    async def route_any_owner(self, share_id: str, address_kind: str) -> ShareRoute | None:
        """The router's lookup: the share, its VM's state, and the VM's address
        on this host (``detail["outside_address"]`` of its ``address_kind`` resource)."""
        row = (
            await self.session.execute(
                select(Share, Vm.status, Vm.auto_resume)
                .join(Vm, Vm.id == Share.vm_id)
                .where(Share.id == share_id)
            )
        ).first()
        if row is None:
            return None
        share, vm_status, auto_resume = row
        detail: dict[str, Any] | None = await self.session.scalar(
            select(HostResourceRow.detail).where(
                HostResourceRow.vm_id == share.vm_id, HostResourceRow.kind == address_kind
            )
        )
        address = (detail or {}).get("outside_address")
        return ShareRoute(
            share_id=share.id,
            owner_id=share.owner_id,
            port=share.port,
            is_public=share.is_public,
            status=share.status,
            vm_id=share.vm_id,
            vm_status=vm_status,
            auto_resume=auto_resume,
            outside_address=str(address) if address else None,
        )
