"""Queries of the vault tables, one repository per table (see ``repositories.py`` for the rules).

Every method takes ``owner_id`` and filters on it, except the call journal's
ingestion (``*_any_owner``), which files calls under the vault they name.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import Vault, VaultCall, VaultCredential, VaultServiceBinding


class VaultRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, vault: Vault) -> Vault:
        self.session.add(vault)
        await self.session.flush()
        return vault

    async def get(self, owner_id: int, vault_id: str) -> Vault | None:
        return await self.session.scalar(select(Vault).where(Vault.owner_id == owner_id, Vault.id == vault_id))

    async def list(self, owner_id: int, ids: Collection[str] | None = None) -> builtins.list[Vault]:
        query = select(Vault).where(Vault.owner_id == owner_id)
        if ids is not None:
            query = query.where(Vault.id.in_(list(ids)))
        return list(await self.session.scalars(query.order_by(Vault.created_at, Vault.id)))

    async def owners_any_owner(self, ids: Collection[str]) -> dict[str, int]:
        """Journal ingestion: the owner of each vault still there."""
        rows = await self.session.execute(select(Vault.id, Vault.owner_id).where(Vault.id.in_(list(ids))))
        return {vault_id: owner_id for vault_id, owner_id in rows.tuples()}

    async def delete(self, vault: Vault) -> None:
        await self.session.delete(vault)
        await self.session.flush()


class VaultCredentialRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, credential: VaultCredential) -> VaultCredential:
        self.session.add(credential)
        await self.session.flush()
        return credential

    async def get(self, owner_id: int, vault_id: str, credential_id: str) -> VaultCredential | None:
        return await self.session.scalar(
            select(VaultCredential).where(
                VaultCredential.owner_id == owner_id,
                VaultCredential.vault_id == vault_id,
                VaultCredential.id == credential_id,
            )
        )

    async def list(self, owner_id: int, vault_ids: Collection[str]) -> builtins.list[VaultCredential]:
        rows = await self.session.scalars(
            select(VaultCredential)
            .where(VaultCredential.owner_id == owner_id, VaultCredential.vault_id.in_(list(vault_ids)))
            .order_by(VaultCredential.created_at, VaultCredential.id)
        )
        return list(rows)

    async def by_name(self, owner_id: int, vault_id: str, name: str) -> VaultCredential | None:
        return await self.session.scalar(
            select(VaultCredential).where(
                VaultCredential.owner_id == owner_id,
                VaultCredential.vault_id == vault_id,
                VaultCredential.name == name,
            )
        )

    async def delete(self, credential: VaultCredential) -> None:
        await self.session.delete(credential)
        await self.session.flush()


class VaultServiceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, service: VaultServiceBinding) -> VaultServiceBinding:
        self.session.add(service)
        await self.session.flush()
        return service

    async def get(self, owner_id: int, vault_id: str, service_id: str) -> VaultServiceBinding | None:
        return await self.session.scalar(
            select(VaultServiceBinding).where(
                VaultServiceBinding.owner_id == owner_id,
                VaultServiceBinding.vault_id == vault_id,
                VaultServiceBinding.id == service_id,
            )
        )

    async def list(self, owner_id: int, vault_ids: Collection[str]) -> builtins.list[VaultServiceBinding]:
        rows = await self.session.scalars(
            select(VaultServiceBinding)
            .where(VaultServiceBinding.owner_id == owner_id, VaultServiceBinding.vault_id.in_(list(vault_ids)))
            .order_by(VaultServiceBinding.created_at, VaultServiceBinding.id)
        )
        return list(rows)

    async def by_host(self, owner_id: int, vault_id: str, host: str) -> VaultServiceBinding | None:
        return await self.session.scalar(
            select(VaultServiceBinding).where(
                VaultServiceBinding.owner_id == owner_id,
                VaultServiceBinding.vault_id == vault_id,
                VaultServiceBinding.host == host,
            )
        )

    async def delete(self, service: VaultServiceBinding) -> None:
        await self.session.delete(service)
        await self.session.flush()


class VaultCallRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def known_ids_any_owner(self, ids: Collection[str]) -> set[str]:
        """Journal ingestion: which of these calls are stored already."""
        return set(await self.session.scalars(select(VaultCall.id).where(VaultCall.id.in_(list(ids)))))

    async def add_all_any_owner(self, calls: Collection[VaultCall]) -> None:
        self.session.add_all(list(calls))
        await self.session.flush()

    async def list(self, owner_id: int, vault_id: str, limit: int) -> builtins.list[VaultCall]:
        rows = await self.session.scalars(
            select(VaultCall)
            .where(VaultCall.owner_id == owner_id, VaultCall.vault_id == vault_id)
            .order_by(VaultCall.at.desc(), VaultCall.id.desc())
            .limit(limit)
        )
        return list(rows)
