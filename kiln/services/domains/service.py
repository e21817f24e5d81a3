"""Custom domains: the rules. A domain is one user's, serves one of their shares,
and is claimed once on this server (by anyone: 409 for everyone else).

- ``create``: checked (``policy``), the share must be the caller's and active;
  the row starts ``pending`` with the records to create. For a ``manual``
  domain the ACME order is made at once, so the challenge TXT is in the answer.
- ``verify``: ``pending`` or ``failed`` -> ``verifying``; the worker
  (``issuance.DomainWorker``) does the rest in the background. A domain
  ``verifying`` already answers as it is; an ``issued`` one too, unless a
  renewal waits for a ``manual`` record (then that is checked again).
- ``delete``: the worker's job is cancelled, the records the provider
  published removed, the certificate file removed, the row deleted.
- ``custom_domain`` in ``POST /v1/vms``: a domain for the share made with the
  VM, in the VM's own insert (``VmService.admit_hooks``); an ``rfc2136``
  domain is verified at once (nothing else would say "go"), a ``manual`` one
  waits for ``verify``. A domain goes with its VM or share (the worker
  releases it).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.domains.errors import DomainError
from kiln.domains.records import route_record
from kiln.schemas.domains import CustomDomainCreateRequest, CustomDomainDeleted, CustomDomainRecord, DomainHealth
from kiln.services.domains.credentials import seal_credentials
from kiln.services.domains.issuance import FAILED, ISSUED, PENDING, VERIFYING, DomainWorker
from kiln.services.domains.policy import DomainPlan, check_domain
from kiln.services.domains.view import record_of, refresh_vm_record
from kiln.services.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from kiln.services.states import ENDED_STATUSES
from kiln.services.vm_policy import CreatePlan
from kiln.store.db import Database
from kiln.store.domains import DomainRepository
from kiln.store.models import CustomDomain, Vm
from kiln.store.repositories import VmRepository
from kiln.store.shares import ShareRepository

HEALTH_SECONDS = 10.0


def _now() -> datetime:
    return datetime.now(UTC)


class DomainService:
    def __init__(self, settings: Settings, db: Database, worker: DomainWorker, credentials_key: bytes) -> None:
        self._settings = settings
        self._db = db
        self.worker = worker
        self._credentials_key = credentials_key

    def record(self, row: CustomDomain) -> CustomDomainRecord:
        return record_of(self._settings, row)

    # -- the routes

    async def create(self, owner_id: int, request: CustomDomainCreateRequest) -> CustomDomainRecord:
        plan, problems = check_domain(self._settings, request.domain, request.dns_provider, request.dns_credentials)
        if plan is None:
            raise InvalidRequest(problems)
        try:
            async with self._db.transaction() as session:
                share = await ShareRepository(session).get(owner_id, request.share_id)
                if share is None:
                    raise NotFound(f"share {request.share_id} not found")
                if share.status != "active":
                    raise Conflict(f"share {share.id} is {share.status}")
                vm = await VmRepository(session).get(owner_id, share.vm_id)
                if vm is None or vm.status in ENDED_STATUSES:
                    raise Conflict(f"share {share.id}'s VM has ended")
                row = await self._add(session, owner_id, plan, share.id, share.vm_id, made_with_vm=False)
        except IntegrityError as error:
            raise Conflict(f"{plan.domain} is claimed already") from error
        if plan.provider == "manual" and self.worker.acme is not None:
            await self._prepare_order(row.id)
        return await self.get(owner_id, row.id)

    async def list(self, owner_id: int) -> list[CustomDomainRecord]:
        async with self._db.transaction() as session:
            return [self.record(row) for row in await DomainRepository(session).list(owner_id)]

    async def get(self, owner_id: int, domain_id: int) -> CustomDomainRecord:
        async with self._db.transaction() as session:
            return self.record(await self._get(session, owner_id, domain_id))

    async def verify(self, owner_id: int, domain_id: int) -> CustomDomainRecord:
        async with self._db.transaction() as session:
            row = await self._get(session, owner_id, domain_id)
            if row.status in (PENDING, FAILED) or (
                row.status == ISSUED and row.acme_order and not self.worker.busy(row.id)
            ):
                if row.status != ISSUED:
                    row.status = VERIFYING
                row.last_error = None
                row.progress = "queued"
                row.updated_at = _now()
                await refresh_vm_record(session, self._settings, row)
                renewal = row.status == ISSUED
            else:
                return self.record(row)
        if renewal:
            self.worker.renew_now(domain_id)
        self.worker.nudge()
        return await self.get(owner_id, domain_id)

    async def delete(self, owner_id: int, domain_id: int) -> CustomDomainDeleted:
        async with self._db.transaction() as session:
            row = await self._get(session, owner_id, domain_id)
        cleanup_error = await self.worker.release(row, reason="deleted by its owner")
        return CustomDomainDeleted(id=domain_id, dns_cleanup_error=cleanup_error)

    async def health(self, owner_id: int, domain_id: int) -> DomainHealth:
        """One HTTPS request to the router with the domain's name, as a browser makes it."""
        record = await self.get(owner_id, domain_id)
        files = self.worker.files
        info = await asyncio.to_thread(files.info, record.domain)
        key_present = await asyncio.to_thread(files.has_key, record.domain)
        unhealthy = DomainHealth(
            healthy=False, status_code=None, latency_ms=None, cert_present=info is not None, key_present=key_present,
            proxy_active=False,
        )  # fmt: skip
        if info is None:
            return unhealthy.model_copy(update={"error": "no certificate yet"})
        port = self._settings.share_https_port
        if port == 0:
            return unhealthy.model_copy(update={"error": "the router serves no HTTPS (KILN_SHARE_HTTPS_PORT=0)"})
        host = self._settings.share_listen_host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
        # The chain is the ACME server's to vouch for; what the router serves is compared with the file.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        started = time.perf_counter()
        try:
            async with asyncio.timeout(HEALTH_SECONDS):
                reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=record.domain)
                try:
                    served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                    head = f"GET / HTTP/1.1\r\nHost: {record.domain}\r\nConnection: close\r\nUser-Agent: kiln-health"
                    writer.write(f"{head}\r\n\r\n".encode())
                    await writer.drain()
                    status_line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError, ssl.SSLError) as failure:
            return unhealthy.model_copy(update={"error": f"the router at {host}:{port} did not answer: {failure}"})
        latency = (time.perf_counter() - started) * 1000
        current = served is not None and hashlib.sha256(served).hexdigest() == info.fingerprint
        parts = status_line.decode(errors="replace").split()
        status_code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        expired = info.not_after <= _now()
        healthy = current and not expired and status_code is not None and status_code < 500
        error = None
        if not current:
            error = "the router serves another certificate for this name"
        elif expired:
            error = "the certificate expired"
        elif status_code is None or status_code >= 500:
            error = f"the share answered {status_code}"
        return DomainHealth(
            healthy=healthy, status_code=status_code, latency_ms=round(latency, 2), cert_present=True,
            key_present=key_present, proxy_active=current, error=error,
        )  # fmt: skip

    # -- POST /v1/vms with custom_domain (VmService's admit hook, after the share's)

    async def domain_new_vm(self, session: AsyncSession, vm: Vm, plan: CreatePlan) -> None:
        request = plan.custom_domain
        if request is None:
            return
        share = vm.share
        if share is None:
            raise InvalidRequest.single(("custom_domain",), "a custom domain serves the VM's share: give share too")
        domain, problems = check_domain(
            self._settings, request.domain, request.dns_provider, request.dns_credentials, ("custom_domain",)
        )
        if domain is None:
            raise InvalidRequest(problems)
        try:
            row = await self._add(session, vm.owner_id, domain, str(share["share_id"]), vm.id, made_with_vm=True)
        except IntegrityError as error:
            raise Conflict(f"{domain.domain} is claimed already") from error
        if self.worker.provider(row).publishes:
            row.status = VERIFYING
            row.progress = "queued"
        vm.custom_domain = self.record(row).model_dump(mode="json")
        self.worker.nudge()

    # -- internals

    async def _add(
        self, session: AsyncSession, owner_id: int, plan: DomainPlan, share_id: str, vm_id: str, *, made_with_vm: bool
    ) -> CustomDomain:
        repository = DomainRepository(session)
        if await repository.claimed(plan.domain):
            raise Conflict(f"{plan.domain} is claimed already")
        if await repository.count(owner_id) >= self._settings.quota_custom_domains:
            raise QuotaExceeded(f"at most {self._settings.quota_custom_domains} custom domains per user")
        route = route_record(plan.domain, self._settings.share_public_address)
        now = _now()
        row = await repository.add(
            CustomDomain(
                owner_id=owner_id,
                domain=plan.domain,
                share_id=share_id,
                vm_id=vm_id,
                made_with_vm=made_with_vm,
                dns_provider=plan.provider,
                status=PENDING,
                dns_records=[route.to_json() | {"present": None}] if route else [],
                published=[],
                created_at=now,
                updated_at=now,
            )
        )
        row.dns_credentials = seal_credentials(self._credentials_key, row.id, plan.credentials)
        return row

    async def _prepare_order(self, domain_id: int) -> None:
        """Order the certificate now, so the challenge to publish is known (a
        failure is recorded; ``verify`` orders again)."""
        try:
            await self.worker.prepare(domain_id)
        except DomainError as error:
            await self.worker.note(domain_id, last_error=f"could not order the certificate yet: {error}")

    async def _get(self, session: AsyncSession, owner_id: int, domain_id: int) -> CustomDomain:
        row = await DomainRepository(session).get(owner_id, domain_id)
        if row is None:
            raise NotFound(f"custom domain {domain_id} not found")
        return row
