"""Shares: the rules (ownership, revocation, signed links); the router serves them.

A share names a VM's port; its URL is ``http://<share-id>.<KILN_SHARE_DOMAIN>``
(with the router's port unless the domain names one). Another user's share is
``NotFound``, as every resource. Revoking is for good: the router answers 404
for a revoked share and for a deleted one, and a link signed for it stops
working with it. The VM record's ``share`` is the share made with the VM
(``share`` in ``POST /v1/vms``), kept current here.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.crypto import links
from kiln.schemas.shares import ShareCreateRequest, ShareLink, ShareRecord, ShareUpdateRequest
from kiln.schemas.vms import ShareRequest
from kiln.services.errors import Conflict, InvalidRequest, NotFound
from kiln.services.events.record import record as record_event
from kiln.services.events.record import share_event
from kiln.services.states import ENDED_STATUSES
from kiln.services.vms import VmService
from kiln.store.db import Database
from kiln.store.models import Share, Vm
from kiln.store.repositories import VmRepository
from kiln.store.shares import ShareRepository

ACTIVE = "active"
REVOKED = "revoked"
# The query parameter of a signed link (the router turns it into a cookie and
# never passes it on to the guest).
LINK_PARAMETER = "kiln_share_token"


def new_share_id() -> str:
    # A DNS label: lowercase letters, digits and '-'.
    return "shr-" + secrets.token_hex(8)


def share_url(settings: Settings, share_id: str) -> str:
    domain = settings.share_domain
    if ":" in domain or settings.share_http_port == 80:
        return f"http://{share_id}.{domain}/"
    return f"http://{share_id}.{domain}:{settings.share_http_port}/"


class ShareService:
    def __init__(self, settings: Settings, db: Database, vms: VmService, link_key: bytes) -> None:
        self._settings = settings
        self._db = db
        self._vms = vms
        self._link_key = link_key

    def record(self, share: Share) -> ShareRecord:
        return ShareRecord(
            share_id=share.id,
            id=share.id,
            vm_id=share.vm_id,
            port=share.port,
            is_public=share.is_public,
            url=share_url(self._settings, share.id),
            status=share.status,
            created_at=share.created_at,
            revoked_at=share.revoked_at,
        )

    # -- the routes

    async def create(self, owner_id: int, request: ShareCreateRequest) -> ShareRecord:
        vm = await self._vm_of(owner_id, request)
        if vm.status in ENDED_STATUSES:
            raise Conflict(f"vm {vm.id} is {vm.status}: there is nothing to share")
        async with self._db.transaction() as session:
            share = await self._add(session, vm, request.port, request.is_public)
        return self.record(share)

    async def list(self, owner_id: int, vm_id: str | None = None) -> list[ShareRecord]:
        async with self._db.transaction() as session:
            return [self.record(share) for share in await ShareRepository(session).list(owner_id, vm_id)]

    async def get(self, owner_id: int, share_id: str) -> ShareRecord:
        async with self._db.transaction() as session:
            return self.record(await self._get(session, owner_id, share_id))

    async def update(self, owner_id: int, share_id: str, request: ShareUpdateRequest) -> ShareRecord:
        async with self._db.transaction() as session:
            share = await self._get(session, owner_id, share_id)
            if request.revoke is False and share.status == REVOKED:
                raise Conflict(f"share {share_id} is revoked for good; make a new one")
            if request.is_public is not None:
                if share.status == REVOKED:
                    raise Conflict(f"share {share_id} is revoked")
                share.is_public = request.is_public
            revoked = bool(request.revoke) and share.status != REVOKED
            if revoked:
                share.status = REVOKED
                share.revoked_at = datetime.now(UTC)
            await self._refresh_vm_record(session, share, self.record(share))
            await record_event(session, share_event(share, "share.revoked" if revoked else "share.updated"))
            return self.record(share)

    async def delete(self, owner_id: int, share_id: str) -> None:
        async with self._db.transaction() as session:
            share = await self._get(session, owner_id, share_id)
            await self._refresh_vm_record(session, share, None)
            await ShareRepository(session).delete(owner_id, share_id)
            await record_event(session, share_event(share, "share.deleted"))

    async def link(self, owner_id: int, share_id: str, expires_in: int | None) -> ShareLink:
        """A signed link: whoever has it may use the share until it expires (a
        browser gets an HttpOnly cookie for the share's host at the first request)."""
        ttl = expires_in or self._settings.share_link_ttl_seconds
        if ttl > self._settings.share_link_max_ttl_seconds:
            raise InvalidRequest.single(
                ("expires_in",), f"must be at most {self._settings.share_link_max_ttl_seconds} seconds"
            )
        share = await self.get(owner_id, share_id)
        if share.status != ACTIVE:
            raise Conflict(f"share {share_id} is {share.status}")
        expires = int(time.time()) + ttl
        token = links.sign(self._link_key, share_id, expires)
        return ShareLink(
            share_id=share_id,
            url=f"{share.url}?{urlencode({LINK_PARAMETER: token})}",
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def app_url(self, owner_id: int, session_id: str, port: int) -> ShareRecord:
        """The session VM's active share of ``port``; a private one is made if it has none."""
        vm = await self._vms.session_vm(owner_id, session_id)
        async with self._db.transaction() as session:
            for share in await ShareRepository(session).list(owner_id, vm.id):
                if share.port == port and share.status == ACTIVE:
                    return self.record(share)
        return await self.create(owner_id, ShareCreateRequest(port=port, vm_id=vm.id))

    # -- POST /v1/vms with ``share``: made in the VM's own insert (VmService's admit hook)

    async def share_new_vm(self, session: AsyncSession, vm: Vm, share: ShareRequest | None) -> None:
        if share is None:
            return
        made = await self._add(session, vm, share.port, share.is_public)
        vm.share = self.record(made).model_dump(mode="json")

    # -- internals

    async def _add(self, session: AsyncSession, vm: Vm, port: int, is_public: bool) -> Share:
        share = await ShareRepository(session).add(
            Share(
                id=new_share_id(),
                owner_id=vm.owner_id,
                vm_id=vm.id,
                port=port,
                is_public=is_public,
                status=ACTIVE,
                created_at=datetime.now(UTC),
            )
        )
        await record_event(session, share_event(share, "share.opened"))
        return share

    async def _get(self, session: AsyncSession, owner_id: int, share_id: str) -> Share:
        share = await ShareRepository(session).get(owner_id, share_id)
        if share is None:
            raise NotFound(f"share {share_id} not found")
        return share

    async def _vm_of(self, owner_id: int, request: ShareCreateRequest) -> Vm:
        if not request.vm_id and request.session_id is None:
            raise InvalidRequest.single(("vm_id",), "name the VM: vm_id or session_id")
        vm = await self._vms.get(owner_id, request.vm_id) if request.vm_id else None
        if request.session_id is not None:
            of_session = await self._vms.session_vm(owner_id, request.session_id)
            if vm is not None and vm.id != of_session.id:
                raise InvalidRequest.single(("session_id",), f"session {request.session_id} is not vm {vm.id}'s")
            vm = of_session
        assert vm is not None
        return vm

    async def _refresh_vm_record(self, session: AsyncSession, share: Share, record: ShareRecord | None) -> None:
        """Keep the VM record's ``share`` (the share made with the VM) as the share is."""
        vm = await VmRepository(session).get(share.owner_id, share.vm_id)
        current: dict[str, Any] | None = vm.share if vm is not None else None
        if vm is not None and current is not None and current.get("share_id") == share.id:
            vm.share = record.model_dump(mode="json") if record is not None else None
