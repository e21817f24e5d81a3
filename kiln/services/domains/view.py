"""A custom domain's record as the API shows it (never its credentials), and the
copy kept in the record of the VM it was made with."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.config import Settings
from kiln.domains.records import CHALLENGE, ROUTE
from kiln.schemas.domains import (
    CertificateOut,
    CnameSetup,
    CustomDomainRecord,
    DnsRecordOut,
    DomainSetup,
    TxtSetup,
)
from kiln.store.models import CustomDomain
from kiln.store.repositories import VmRepository

NO_ACME = "this server issues no certificates: it has no ACME directory (KILN_ACME_DIRECTORY is empty)"


def domain_url(settings: Settings, domain: str) -> str:
    port = settings.share_https_port
    return f"https://{domain}/" if port in (443, 0) else f"https://{domain}:{port}/"


def record_of(settings: Settings, row: CustomDomain) -> CustomDomainRecord:
    records = [DnsRecordOut.model_validate(record) for record in row.dns_records]
    setup = DomainSetup(verify_endpoint=f"/v1/custom-domains/{row.id}/verify")
    for record in records:
        if record.purpose == CHALLENGE:
            setup.txt_record = TxtSetup(name=record.name, value=record.value)
        elif record.purpose == ROUTE and record.type == "CNAME":
            setup.cname = CnameSetup(name=record.name, target=record.value)
        elif record.purpose == ROUTE:
            setup.a_record = TxtSetup(name=record.name, value=record.value)
    certificate = CertificateOut.model_validate(row.certificate) if row.certificate else None
    return CustomDomainRecord(
        id=row.id,
        domain=row.domain,
        share_id=row.share_id,
        vm_id=row.vm_id,
        dns_provider=row.dns_provider,
        status=row.status,
        dns_records=records,
        last_error=row.last_error,
        progress=row.progress,
        setup=setup,
        url=domain_url(settings, row.domain),
        certificates=None if settings.acme_directory else NO_ACME,
        certificate=certificate,
        created_at=row.created_at,
        updated_at=row.updated_at,
        verified_at=row.verified_at,
        issued_at=row.issued_at,
    )


async def refresh_vm_record(session: AsyncSession, settings: Settings, row: CustomDomain, gone: bool = False) -> None:
    """Keep ``custom_domain`` of the VM the domain was made with as the domain is."""
    if not row.made_with_vm:
        return
    vm = await VmRepository(session).get(row.owner_id, row.vm_id)
    if vm is None:
        return
    current: dict[str, Any] | None = vm.custom_domain
    if gone:
        if current is not None and current.get("id") == row.id:
            vm.custom_domain = None
        return
    vm.custom_domain = record_of(settings, row).model_dump(mode="json")
