"""Vaults, their credentials and their services: the rules.

Another user's vault (or a credential or service of it) is a 404, never a
403. A credential's value is sealed under the master key the moment it
arrives (``kiln.crypto.sealing`` with the master key's ``vault-credentials``
purpose key, bound to the credential's id) and never
returned, logged or put into an error; only the egress daemon opens it, for the
request it goes into. Names of credentials are unique in their vault (an
``auth_config`` names one), hosts of services too. A service whose
``auth_config`` names a credential the vault does not hold is a 422; deleting
a credential a service names is allowed, and that service injects nothing
until a credential of that name is added again.

Each change that alters what bound VMs inject is pushed to them at once
(``VaultBindings``): their next request uses it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.crypto.sealing import seal
from kiln.services.errors import Conflict, InvalidRequest, NotFound
from kiln.services.vault_bindings import VaultBindings
from kiln.store.db import Database
from kiln.store.models import Vault, VaultCredential, VaultServiceBinding
from kiln.store.vault_repositories import VaultCredentialRepository, VaultRepository, VaultServiceRepository
from kiln.vault import catalog
from kiln.vault.auth import MAX_VALUE_LENGTH, AuthConfigError, is_header_text, parse_auth_config
from kiln.vault.binding import credential_context
from kiln.vault.hosts import HostError, parse_service_host

CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_CREDENTIALS = 256
MAX_SERVICES = 256


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def check_value(value: str, loc: tuple[str, ...] = ("value",)) -> bytes:
    """The value as it goes into a header; the error never quotes it."""
    if not 1 <= len(value) <= MAX_VALUE_LENGTH or not is_header_text(value):
        raise InvalidRequest.single(
            loc,
            f"must be 1-{MAX_VALUE_LENGTH} printable ASCII characters without leading or trailing "
            "blanks (it is sent as a header value)",
        )
    return value.encode("ascii")


class VaultService:
    def __init__(self, db: Database, key: bytes, bindings: VaultBindings) -> None:
        self.db = db
        self._key = key  # the master key's VAULT_PURPOSE key: seals, never opens here
        self.bindings = bindings

    # ---- vaults

    async def create(self, owner_id: int, name: str, description: str | None) -> Vault:
        now = _now()
        vault = Vault(id=_new_id("vault"), owner_id=owner_id, name=name, description=description,
                      created_at=now, updated_at=now)  # fmt: skip
        async with self.db.transaction() as session:
            return await VaultRepository(session).add(vault)

    async def list_vaults(self, owner_id: int) -> list[Vault]:
        async with self.db.transaction() as session:
            return await VaultRepository(session).list(owner_id)

    async def get(self, owner_id: int, vault_id: str) -> Vault:
        async with self.db.transaction() as session:
            return await self._vault(session, owner_id, vault_id)

    async def update(self, owner_id: int, vault_id: str, changes: dict[str, Any]) -> Vault:
        async with self.db.transaction() as session:
            vault = await self._vault(session, owner_id, vault_id)
            for field in ("name", "description"):
                if changes.get(field) is not None:
                    setattr(vault, field, changes[field])
            vault.updated_at = _now()
        return vault

    async def delete(self, owner_id: int, vault_id: str) -> None:
        """The vault with its credentials, services and calls; it leaves every VM that named it."""
        async with self.db.transaction() as session:
            repository = VaultRepository(session)
            await repository.delete(await self._vault(session, owner_id, vault_id))
        await self.bindings.refresh(await self.bindings.unbind_everywhere(owner_id, vault_id))

    async def discover(self, owner_id: int, vault_id: str) -> dict[str, Any]:
        async with self.db.transaction() as session:
            vault = await self._vault(session, owner_id, vault_id)
            credentials = await VaultCredentialRepository(session).list(owner_id, [vault_id])
            services = await VaultServiceRepository(session).list(owner_id, [vault_id])
        names = {credential.name for credential in credentials}
        described = [self.describe(service, names) for service in services]
        return {
            "id": vault.id,
            "vault_id": vault.id,
            "name": vault.name,
            "credentials": [
                {"id": c.id, "name": c.name, "credential_type": c.credential_type} for c in credentials
            ],
            "services": [
                {key: entry[key] for key in ("id", "host", "credential", "enabled", "credential_present")}
                | {"auth_type": entry["auth_config"]["type"]}
                for entry in described
            ],
            "hosts": [e["host"] for e in described if e["enabled"] and e["credential_present"]],
        }

    # ---- credentials

    async def add_credential(
        self, owner_id: int, vault_id: str, name: str, value: str, credential_type: str, description: str | None
    ) -> VaultCredential:
        if not CREDENTIAL_NAME.fullmatch(name):
            raise InvalidRequest.single(
                ("name",), "must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        plaintext = check_value(value)
        credential_id = _new_id("cred")
        credential = VaultCredential(
            id=credential_id, owner_id=owner_id, vault_id=vault_id, name=name, credential_type=credential_type,
            description=description, sealed_value=seal(self._key, plaintext, credential_context(credential_id)),
            created_at=_now(),
        )  # fmt: skip
        async with self._unique(f"vault {vault_id} already has a credential named {name!r}") as session:
            await self._vault(session, owner_id, vault_id)
            repository = VaultCredentialRepository(session)
            if len(await repository.list(owner_id, [vault_id])) >= MAX_CREDENTIALS:
                raise Conflict(f"vault {vault_id} holds {MAX_CREDENTIALS} credentials, the most it may")
            await repository.add(credential)
        await self.bindings.refresh_vault(owner_id, vault_id)  # a service may have waited for this name
        return credential

    async def list_credentials(self, owner_id: int, vault_id: str) -> list[VaultCredential]:
        async with self.db.transaction() as session:
            await self._vault(session, owner_id, vault_id)
            return await VaultCredentialRepository(session).list(owner_id, [vault_id])

    async def rotate_credential(self, owner_id: int, vault_id: str, credential_id: str, value: str) -> VaultCredential:
        plaintext = check_value(value)
        async with self.db.transaction() as session:
            credential = await self._credential(session, owner_id, vault_id, credential_id)
            credential.sealed_value = seal(self._key, plaintext, credential_context(credential.id))
            credential.rotated_at = _now()
        await self.bindings.refresh_vault(owner_id, vault_id)
        return credential

    async def delete_credential(self, owner_id: int, vault_id: str, credential_id: str) -> None:
        async with self.db.transaction() as session:
            credential = await self._credential(session, owner_id, vault_id, credential_id)
            await VaultCredentialRepository(session).delete(credential)
        await self.bindings.refresh_vault(owner_id, vault_id)

    # ---- services

    async def add_service(
        self,
        owner_id: int,
        vault_id: str,
        host: str,
        auth_config: dict[str, Any],
        enabled: bool,
        description: str | None,
    ) -> VaultServiceBinding:
        return (await self._add_services(owner_id, vault_id, [(host, auth_config, enabled, description, None)]))[0]

    async def add_from_templates(
        self, owner_id: int, vault_id: str, template_ids: list[str]
    ) -> list[VaultServiceBinding]:
        unknown = [tid for tid in template_ids if tid not in catalog.BY_ID]
        if unknown:
            known = ", ".join(sorted(catalog.BY_ID))
            raise InvalidRequest.single(("template_ids",), f"unknown template {unknown[0]!r} (known: {known})")
        wanted = [catalog.BY_ID[tid] for tid in dict.fromkeys(template_ids)]
        return await self._add_services(
            owner_id, vault_id, [(t.host, t.auth_config(), True, t.name, t.id) for t in wanted],
            loc=("template_ids",),
        )  # fmt: skip

    async def list_services(self, owner_id: int, vault_id: str) -> list[dict[str, Any]]:
        async with self.db.transaction() as session:
            await self._vault(session, owner_id, vault_id)
            services = await VaultServiceRepository(session).list(owner_id, [vault_id])
            names = {c.name for c in await VaultCredentialRepository(session).list(owner_id, [vault_id])}
        return [self.describe(service, names) for service in services]

    async def delete_service(self, owner_id: int, vault_id: str, service_id: str) -> None:
        async with self.db.transaction() as session:
            await self._vault(session, owner_id, vault_id)
            repository = VaultServiceRepository(session)
            service = await repository.get(owner_id, vault_id, service_id)
            if service is None:
                raise NotFound(f"service {service_id} not found")
            await repository.delete(service)
        await self.bindings.refresh_vault(owner_id, vault_id)

    def describe(self, service: VaultServiceBinding, credential_names: set[str]) -> dict[str, Any]:
        credential = parse_auth_config(service.auth_config).credential
        return {
            "id": service.id, "service_id": service.id, "vault_id": service.vault_id, "host": service.host,
            "auth_config": service.auth_config, "enabled": service.enabled, "description": service.description,
            "template_id": service.template_id, "credential": credential,
            "credential_present": credential in credential_names, "created_at": service.created_at,
        }  # fmt: skip

    async def _add_services(
        self,
        owner_id: int,
        vault_id: str,
        wanted: list[tuple[str, dict[str, Any], bool, str | None, str | None]],
        loc: tuple[str, ...] | None = None,
    ) -> list[VaultServiceBinding]:
        """Services made all at once, or none (422 for a bad host or auth_config,
        or a credential the vault lacks; 409 for a host it covers already)."""
        rows = []
        for host, raw_auth, enabled, description, template_id in wanted:
            try:
                parsed_host = parse_service_host(host)
            except HostError as error:
                raise InvalidRequest.single(loc or ("host",), str(error)) from None
            try:
                auth = parse_auth_config(raw_auth)
            except AuthConfigError as error:
                raise InvalidRequest.single(loc or ("auth_config", error.field), str(error)) from None
            rows.append(
                (auth.credential, VaultServiceBinding(
                    id=_new_id("svc"), owner_id=owner_id, vault_id=vault_id, host=parsed_host,
                    auth_config=auth.to_wire(), enabled=enabled, description=description,
                    template_id=template_id, created_at=_now(),
                ))
            )  # fmt: skip
        async with self._unique(f"vault {vault_id} already has a service for one of these hosts") as session:
            await self._vault(session, owner_id, vault_id)
            services = VaultServiceRepository(session)
            existing = await services.list(owner_id, [vault_id])
            if len(existing) + len(rows) > MAX_SERVICES:
                raise Conflict(f"vault {vault_id} may hold at most {MAX_SERVICES} services")
            names = {c.name for c in await VaultCredentialRepository(session).list(owner_id, [vault_id])}
            taken = {service.host for service in existing}
            for credential, row in rows:
                if credential not in names:
                    where = loc or ("auth_config", "key" if row.auth_config.get("key") else "token")
                    raise InvalidRequest.single(where, f"vault {vault_id} has no credential named {credential!r}")
                if row.host in taken:
                    raise Conflict(f"vault {vault_id} already has a service for {row.host}")
                taken.add(row.host)
                await services.add(row)
        await self.bindings.refresh_vault(owner_id, vault_id)
        return [row for _, row in rows]

    # ---- lookups

    @asynccontextmanager
    async def _unique(self, conflict: str) -> AsyncIterator[AsyncSession]:
        """A transaction whose unique-constraint failure (a concurrent twin) is a 409."""
        try:
            async with self.db.transaction() as session:
                yield session
        except IntegrityError:
            raise Conflict(conflict) from None

    @staticmethod
    async def _vault(session: AsyncSession, owner_id: int, vault_id: str) -> Vault:
        vault = await VaultRepository(session).get(owner_id, vault_id)
        if vault is None:
            raise NotFound(f"vault {vault_id} not found")
        return vault

    async def _credential(
        self, session: AsyncSession, owner_id: int, vault_id: str, credential_id: str
    ) -> VaultCredential:
        await self._vault(session, owner_id, vault_id)
        credential = await VaultCredentialRepository(session).get(owner_id, vault_id, credential_id)
        if credential is None:
            raise NotFound(f"credential {credential_id} not found")
        return credential
