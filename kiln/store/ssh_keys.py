"""Queries of the ssh_keys table, and the SSH gateway's one lookup.

``SshKeyRepository`` serves the key service (every method takes ``owner_id``)
but ``login_any_owner``, which the gateway runs (read-only) for each login
attempt: the VM a username names, if its owner registered the key offered.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import SshKey, Vm


@dataclass(frozen=True)
class SshLogin:
    """What the gateway needs once a key opened a VM."""

    vm_id: str
    owner_id: int
    session_id: str
    status: str
    auto_resume: bool
    key_id: int


class SshKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, key: SshKey) -> SshKey:
        self.session.add(key)
        await self.session.flush()
        return key

    async def list(self, owner_id: int) -> builtins.list[SshKey]:
        rows = await self.session.scalars(select(SshKey).where(SshKey.owner_id == owner_id).order_by(SshKey.id))
        return list(rows)

    async def by_fingerprint(self, owner_id: int, fingerprint: str) -> SshKey | None:
        return await self.session.scalar(
            select(SshKey).where(SshKey.owner_id == owner_id, SshKey.fingerprint == fingerprint)
        )

    async def delete(self, owner_id: int, key_id: int) -> bool:
        result = await self.session.execute(delete(SshKey).where(SshKey.owner_id == owner_id, SshKey.id == key_id))
        return bool(getattr(result, "rowcount", 0))

    async def login_any_owner(self, username: str, fingerprint: str, statuses: Collection[str]) -> SshLogin | None:
        """The VM ``username`` names (its id, or a session id of its owner), in one of
        ``statuses``, whose owner registered the key ``fingerprint``; else None. A
        VM id wins over a session id; of a session's VMs, the newest."""
        rows = (
            await self.session.execute(
                select(Vm.id, Vm.owner_id, Vm.session_id, Vm.status, Vm.auto_resume, SshKey.id)
                .join(SshKey, SshKey.owner_id == Vm.owner_id)
                .where(
                    or_(Vm.id == username, Vm.session_id == username),
                    Vm.status.in_(statuses),
                    SshKey.fingerprint == fingerprint,
                )
                .order_by(Vm.created_at.desc())
            )
        ).all()
        if not rows:
            return None
        best = next((row for row in rows if row[0] == username), rows[0])
        return SshLogin(*best)
