"""The issuance worker: records published and checked, certificates ordered,
renewed, and everything a domain made removed when it goes.

One loop (``DomainWorker``) wakes every ``TICK_SECONDS`` or when nudged and:

1. releases domains whose share is gone or revoked or whose VM ended: the
   records the provider published are removed, the certificate file too, the
   row deleted; certificate files no row names are removed as well;
2. starts a job for each ``verifying`` domain that has none (a verify, a VM
   made with ``custom_domain``, or one a stopped server left half-way);
3. starts a renewal job for each issued certificate with less than
   ``KILN_ACME_RENEW_BEFORE_DAYS`` left (at most once per
   ``KILN_ACME_RENEW_CHECK_SECONDS`` each).

A job (``_issue``), each step recorded in the row's ``progress``: the ACME
order (kept in the row until it ends, so a ``manual`` domain's challenge
stays what the user was shown); the records (written to ``published`` before
they are sent, then sent by the provider); the check, asking the domain's
authoritative servers (retried until ``KILN_DOMAINS_PROPAGATION_SECONDS`` for
a provider that publishes, once for ``manual``); the challenge answered, its
validation awaited, the order finalized; key and chain written to
``domains/certs/<domain>.pem`` (the router picks it up at the next
handshake); the challenge record removed. Any failure ends it ``failed`` with
the reason in ``last_error``; a failed renewal leaves the domain ``issued``
(its certificate still serves) with the reason.

The ACME library blocks: each of its calls runs in a worker thread and is
short (one or a few HTTP exchanges), so the API's event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.config import Settings
from kiln.domains.acme_client import AcmeClient, Order
from kiln.domains.certs import CertificateFiles, describe
from kiln.domains.errors import AcmeError, DomainError, RecordsMissing, UpdateRefused
from kiln.domains.lookup import RecordChecker, missing_summary
from kiln.domains.providers import DnsProvider, ProviderOptions, provider_for
from kiln.domains.records import CHALLENGE, DnsRecord, challenge_record, route_record
from kiln.services.domains.credentials import open_credentials
from kiln.services.domains.view import NO_ACME, refresh_vm_record
from kiln.services.states import ENDED_STATUSES
from kiln.store.db import Database
from kiln.store.domains import DomainRepository
from kiln.store.models import CustomDomain

log = logging.getLogger(__name__)

PENDING, VERIFYING, ISSUED, FAILED = "pending", "verifying", "issued", "failed"
TICK_SECONDS = 2.0
CHECK_INTERVAL_SECONDS = 2.0
VALIDATION_SECONDS = 120.0
POLL_SECONDS = 1.0
# A certificate or key file no domain holds is removed once it is this old.
STRAY_FILE_SECONDS = 60.0
# At a stop, releasing what ended VMs left may take this long (DNS updates).
STOP_RELEASE_SECONDS = 20.0


def _now() -> datetime:
    return datetime.now(UTC)


class DomainWorker:
    def __init__(self, settings: Settings, db: Database, credentials_key: bytes) -> None:
        self._settings = settings
        self._db = db
        self._credentials_key = credentials_key
        self.files = CertificateFiles(settings.domains_dir)
        self.checker = RecordChecker(settings.domains_resolver)
        self.acme: AcmeClient | None = None
        if settings.acme_directory:
            self.acme = AcmeClient(
                settings.acme_directory,
                settings.domains_dir / "acme",
                ca_bundle=settings.acme_ca_bundle,
                email=settings.acme_email,
            )
        self._jobs: dict[int, asyncio.Task[None]] = {}
        self._writes: dict[int, asyncio.Future[None]] = {}
        self._renewal_tried: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    # -- life

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="custom-domains")

    async def stop(self) -> None:
        """Cancel the loop and the jobs (a ``verifying`` domain resumes at the next
        start), then release what ended VMs left (VMs deleted just before a stop)."""
        tasks = [task for task in (self._loop, *self._jobs.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._writes.values(), return_exceptions=True)
        self._loop = None
        self._jobs.clear()
        self._writes.clear()
        try:
            async with asyncio.timeout(STOP_RELEASE_SECONDS):
                await self.release_orphans()
        except Exception as error:
            log.warning("custom domains: not every ended VM's domain was released at stop: %s", error)

    def nudge(self) -> None:
        self._wake.set()

    def busy(self, domain_id: int) -> bool:
        return domain_id in self._jobs

    async def cancel(self, domain_id: int) -> None:
        """Stop the domain's job, and wait for a certificate it was writing."""
        task = self._jobs.pop(domain_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        writing = self._writes.pop(domain_id, None)
        if writing is not None:
            await asyncio.gather(writing, return_exceptions=True)

    def renew_now(self, domain_id: int) -> None:
        """A renewal waiting for a ``manual`` record: try it again now."""
        self._renewal_tried[domain_id] = time.monotonic()
        self._start(domain_id, renewal=True)

    async def prepare(self, domain_id: int) -> None:
        """Make the ACME order of a new domain, so its challenge can be shown."""
        row = await self._load(domain_id)
        if row is None or self.acme is None:
            return
        order, _ = await self._order(row)
        route = route_record(row.domain, self._settings.share_public_address)
        challenge = challenge_record(row.domain, order.challenge) if order.challenge else None
        records = [record.to_json() | {"present": None} for record in (route, challenge) if record]
        await self._update(domain_id, dns_records=records, progress=None)

    async def note(self, domain_id: int, **fields: Any) -> None:
        await self._update(domain_id, **fields)

    def provider(self, row: CustomDomain) -> DnsProvider:
        credentials = open_credentials(self._credentials_key, row.id, row.dns_credentials)
        options = ProviderOptions(allow_private=self._settings.domains_allow_private_dns)
        return provider_for(row.dns_provider, credentials, options)

    # -- the loop

    async def _run(self) -> None:
        while True:
            try:
                await self.pass_once()
            except Exception:
                log.exception("custom domains: a pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()

    async def release_orphans(self) -> None:
        """Release the domains whose share or VM ended; remove files no domain holds."""
        async with self._db.transaction() as session:
            repository = DomainRepository(session)
            orphans = await repository.orphaned_any_owner(ENDED_STATUSES)
            known = {row.domain for row in await repository.with_status_any_owner([PENDING, VERIFYING, ISSUED, FAILED])}
        for row in orphans:
            await self.release(row, reason=f"its share {row.share_id} or VM {row.vm_id} ended")
        await asyncio.to_thread(self._remove_stray_files, known - {row.domain for row in orphans})

    async def pass_once(self) -> None:
        await self.release_orphans()
        async with self._db.transaction() as session:
            repository = DomainRepository(session)
            waiting = await repository.with_status_any_owner([VERIFYING])
            renew_before = _now() + timedelta(days=self._settings.acme_renew_before_days)
            expiring = await repository.expiring_any_owner(renew_before) if self.acme else []
        for row in waiting:
            self._start(row.id, renewal=False)
        now = time.monotonic()
        for row in expiring:
            if row.status == ISSUED and row.expires_at is not None and row.expires_at <= _now():
                await self._update(row.id, status=FAILED, last_error="the certificate expired and was not renewed")
                continue
            tried = self._renewal_tried.get(row.id)
            if row.status != ISSUED or (tried is not None and now - tried < self._settings.acme_renew_check_seconds):
                continue
            self._renewal_tried[row.id] = now
            self._start(row.id, renewal=True)

    def _start(self, domain_id: int, *, renewal: bool) -> None:
        if domain_id in self._jobs:
            return
        task = asyncio.create_task(self._job(domain_id, renewal), name=f"custom-domain:{domain_id}")
        self._jobs[domain_id] = task
        task.add_done_callback(
            lambda done: self._jobs.pop(domain_id, None) if self._jobs.get(domain_id) is done else None
        )

    def _write_certificate(self, domain: str, key_pem: bytes, fullchain: str) -> None:
        self.files.write(domain, key_pem, fullchain.encode())
        self.files.forget_pending_key(domain)

    def _remove_stray_files(self, known: set[str]) -> None:
        for directory in (self.files.directory / "certs", self.files.directory / "keys"):
            if not directory.is_dir():
                continue
            for path in directory.glob("*.pem"):
                # Young files may belong to a domain committed after ``known`` was read.
                if path.stem not in known and time.time() - path.stat().st_mtime > STRAY_FILE_SECONDS:
                    log.info("custom domains: removing %s (no domain holds it)", path)
                    path.unlink(missing_ok=True)

    # -- releasing

    async def release(self, row: CustomDomain, *, reason: str) -> str | None:
        """Remove what the domain made (records, files) and its row; returns why
        the records could not be removed, if they could not."""
        await self.cancel(row.id)
        row = await self._load(row.id) or row  # what the job published until it stopped
        cleanup_error = None
        published = [DnsRecord.from_json(record) for record in row.published]
        if published:
            try:
                await self.provider(row).remove(published)
            except DomainError as error:
                cleanup_error = str(error)
            except Exception as error:  # e.g. credentials that no longer open (another master key)
                cleanup_error = f"the records could not be removed: {error or type(error).__name__}"
            if cleanup_error:
                log.warning("custom domain %s: its records stay (%s)", row.domain, cleanup_error)
        await asyncio.to_thread(self.files.remove, row.domain)
        async with self._db.transaction() as session:
            current = await DomainRepository(session).get_any_owner(row.id)
            if current is not None:
                await refresh_vm_record(session, self._settings, current, gone=True)
                await DomainRepository(session).delete(row.id)
        self._renewal_tried.pop(row.id, None)
        log.info("custom domain %s released: %s", row.domain, reason)
        return cleanup_error

    # -- one job

    async def _job(self, domain_id: int, renewal: bool) -> None:
        try:
            await self._issue(domain_id, renewal)
        except asyncio.CancelledError:
            raise
        except DomainError as error:
            await self._failed(domain_id, str(error), renewal)
        except Exception as error:
            log.exception("custom domain %s: issuance failed", domain_id)
            await self._failed(domain_id, f"internal error: {error or type(error).__name__}", renewal)

    async def _failed(self, domain_id: int, reason: str, renewal: bool) -> None:
        if renewal:
            await self._update(
                domain_id, last_error=f"renewal failed (the certificate in force still serves): {reason}"
            )
        else:
            await self._update(domain_id, status=FAILED, last_error=reason, progress=None)

    async def _issue(self, domain_id: int, renewal: bool) -> None:
        row = await self._load(domain_id)
        if row is None:
            return
        provider = self.provider(row)
        route = route_record(row.domain, self._settings.share_public_address)
        if self.acme is None:
            records = [route] if route else []
            await self._publish_and_check(row, provider, records)
            raise DomainError(f"the records are in place, but {NO_ACME}")
        order, key_pem = await self._order(row)
        records = [
            record
            for record in (route, challenge_record(row.domain, order.challenge) if order.challenge else None)
            if record
        ]
        await self._publish_and_check(row, provider, records)
        await self._update(
            domain_id, verified_at=_now(), progress="waiting for the ACME server to validate the challenge"
        )
        acme = self.acme
        await asyncio.to_thread(acme.answer, order)
        deadline = time.monotonic() + VALIDATION_SECONDS
        while True:
            state, why = await asyncio.to_thread(acme.authorizations, order)
            if state == "valid":
                break
            if state == "invalid":
                await self._update(domain_id, acme_order=None)
                raise AcmeError(f"the ACME server did not validate {row.domain}: {why}")
            if time.monotonic() > deadline:
                raise AcmeError(f"the ACME server did not validate {row.domain} within {VALIDATION_SECONDS:g} s")
            await asyncio.sleep(POLL_SECONDS)
        await self._update(domain_id, progress="finalizing the order")
        fullchain = None
        while fullchain is None:
            fullchain = await asyncio.to_thread(acme.finalize, order)
            if fullchain is None and time.monotonic() > deadline:
                raise AcmeError(f"the ACME server did not issue the certificate within {VALIDATION_SECONDS:g} s")
        info = describe(fullchain.encode())
        if row.domain not in info.names:
            raise AcmeError(f"the ACME server issued a certificate for {', '.join(info.names)}, not {row.domain}")
        if await self._load(domain_id) is None:
            return  # deleted meanwhile: write nothing
        # A cancelled job must not leave its thread writing after a release removed the file.
        writing = asyncio.ensure_future(asyncio.to_thread(self._write_certificate, row.domain, key_pem, fullchain))
        self._writes[domain_id] = writing
        await asyncio.shield(writing)
        self._writes.pop(domain_id, None)
        kept = [record for record in records if record.purpose != CHALLENGE]
        await self._update(
            domain_id,
            status=ISSUED,
            last_error=None,
            progress=f"certificate {'renewed' if renewal else 'issued'}",
            acme_order=None,
            issued_at=_now(),
            expires_at=info.not_after,
            certificate={
                "serial": info.serial,
                "issuer": info.issuer,
                "not_before": info.not_before.isoformat(),
                "not_after": info.not_after.isoformat(),
            },
        )
        self._renewal_tried[domain_id] = time.monotonic()  # the next renewal check is a check interval away
        log.info("custom domain %s: certificate %s until %s", row.domain, info.serial, info.not_after)
        challenges = [record for record in records if record.purpose == CHALLENGE]
        if challenges and provider.publishes:
            try:
                await provider.remove(challenges)
                await self._update(domain_id, published=[record.to_json() for record in kept])
            except DomainError as error:
                log.warning("custom domain %s: the challenge record stays: %s", row.domain, error)

    async def _order(self, row: CustomDomain) -> tuple[Order, bytes]:
        """The order in progress if it can still be completed, else a new one."""
        assert self.acme is not None
        acme = self.acme
        key_exists = await asyncio.to_thread(self.files.pending_key_path(row.domain).exists)
        if row.acme_order and key_exists:
            order = Order(row.acme_order["resource"], row.acme_order.get("challenge"))
            try:
                state, _ = await asyncio.to_thread(acme.authorizations, order)
            except AcmeError as error:
                log.info("custom domain %s: a new order (the old one: %s)", row.domain, error)
                state = "invalid"
            if state != "invalid":
                return order, await asyncio.to_thread(self.files.pending_key, row.domain)
        await self._update(row.id, progress="ordering a certificate")
        key_pem = await asyncio.to_thread(self.files.pending_key, row.domain)
        order = await asyncio.to_thread(acme.new_order, row.domain, key_pem)
        await self._update(row.id, acme_order={"resource": order.resource, "challenge": order.challenge})
        return order, key_pem

    async def _publish_and_check(self, row: CustomDomain, provider: DnsProvider, records: list[DnsRecord]) -> None:
        # What the last check found stands until this one ends (a renewal's
        # re-check must not show records it has not looked at yet as unknown).
        known = {(e["type"], e["name"], e["value"]): e.get("present") for e in row.dns_records or []}
        shown = [
            record.to_json() | {"present": known.get((record.type, record.name, record.value))} for record in records
        ]
        await self._update(row.id, dns_records=shown)
        if provider.publishes and records:
            await self._update(
                row.id,
                progress=f"publishing the records ({provider.name})",
                published=_merge(row.published, records),
            )
            try:
                await provider.publish(records)
            except UpdateRefused:
                await self._update(row.id, published=row.published)  # refused: nothing of it is there
                raise
        await self._update(row.id, progress="checking the records on the domain's authoritative DNS servers")
        patience = self._settings.domains_propagation_seconds if provider.publishes else 0.0
        deadline = time.monotonic() + patience
        while True:
            findings = await self.checker.check(row.domain, records, provider.servers())
            present = {(finding.record.name, finding.record.type): finding.present for finding in findings}
            await self._update(
                row.id,
                dns_records=[entry | {"present": present.get((entry["name"], entry["type"]))} for entry in shown],
            )
            if all(finding.present for finding in findings):
                return
            if time.monotonic() >= deadline:
                raise RecordsMissing(missing_summary(findings))
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)

    # -- the row

    async def _load(self, domain_id: int) -> CustomDomain | None:
        async with self._db.transaction() as session:
            return await DomainRepository(session).get_any_owner(domain_id)

    async def _update(self, domain_id: int, **fields: Any) -> None:
        async with self._db.transaction() as session:
            row = await DomainRepository(session).get_any_owner(domain_id)
            if row is None:
                return
            for name, value in fields.items():
                setattr(row, name, value)
            row.updated_at = _now()
            await refresh_vm_record(session, self._settings, row)


def _merge(published: list[dict[str, Any]], records: list[DnsRecord]) -> list[dict[str, Any]]:
    """``published`` plus ``records``; a record replaces the one of its name and type."""
    fresh = {(record.name, record.type): record.to_json() for record in records}
    kept = [entry for entry in published if (entry["name"], entry["type"]) not in fresh]
    return kept + list(fresh.values())
