"""Queries of the custom domains table, and the share router's lookup of one.

Every method takes ``owner_id`` but the ``*_any_owner`` ones: the issuance
worker's (domains waiting for work, certificates to renew, domains whose share
or VM ended) and the router's ``share_of_domain_any_owner``.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import CustomDomain, Share, Vm


class DomainRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, domain: CustomDomain) -> CustomDomain:
        self.session.add(domain)
        await self.session.flush()
        return domain

    async def get(self, owner_id: int, domain_id: int) -> CustomDomain | None:
        return await self.session.scalar(
            select(CustomDomain).where(CustomDomain.owner_id == owner_id, CustomDomain.id == domain_id)
        )

    async def list(self, owner_id: int) -> builtins.list[CustomDomain]:
        query = select(CustomDomain).where(CustomDomain.owner_id == owner_id).order_by(CustomDomain.id)
        return list(await self.session.scalars(query))

    async def count(self, owner_id: int) -> int:
        query = select(func.count()).select_from(CustomDomain).where(CustomDomain.owner_id == owner_id)
        return int(await self.session.scalar(query) or 0)

    async def claimed(self, domain: str) -> bool:
        """Whether anyone holds ``domain`` already."""
        return await self.session.scalar(select(CustomDomain.id).where(CustomDomain.domain == domain)) is not None

    async def delete(self, domain_id: int) -> None:
        await self.session.execute(delete(CustomDomain).where(CustomDomain.id == domain_id))

    # -- the worker's

    async def get_any_owner(self, domain_id: int) -> CustomDomain | None:
        return await self.session.get(CustomDomain, domain_id, populate_existing=True)

    async def with_status_any_owner(self, statuses: Collection[str]) -> builtins.list[CustomDomain]:
        query = select(CustomDomain).where(CustomDomain.status.in_(list(statuses))).order_by(CustomDomain.id)
        return list(await self.session.scalars(query))

    async def expiring_any_owner(self, before: datetime) -> builtins.list[CustomDomain]:
        """Domains with a certificate that runs out before ``before``."""
        query = select(CustomDomain).where(CustomDomain.expires_at.is_not(None), CustomDomain.expires_at < before)
        return list(await self.session.scalars(query.order_by(CustomDomain.expires_at)))

    async def orphaned_any_owner(self, ended_statuses: Collection[str]) -> builtins.list[CustomDomain]:
        """Domains whose share is gone or revoked, or whose VM ended."""
        query = (
            select(CustomDomain)
            .outerjoin(Share, Share.id == CustomDomain.share_id)
            .outerjoin(Vm, Vm.id == CustomDomain.vm_id)
            .where(
                or_(Share.id.is_(None), Share.status != "active", Vm.id.is_(None), Vm.status.in_(list(ended_statuses)))
            )
        )
        return list(await self.session.scalars(query.order_by(CustomDomain.id)))

    # -- the router's

    async def share_of_domain_any_owner(self, domain: str) -> str | None:
        """The share a domain serves, if the domain is claimed."""
        return await self.session.scalar(select(CustomDomain.share_id).where(CustomDomain.domain == domain))
