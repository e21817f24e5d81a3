"""Wire models of the custom-domain routes (API.md, "Networking"; the instavm SDK's
``custom_domains``, whose CLI reads ``setup``, ``url`` and the health keys)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody


class CustomDomainCreateRequest(RequestBody):
    """POST /v1/custom-domains. ``dns_provider``: ``rfc2136`` or ``manual``."""

    domain: str = Field(max_length=260)
    share_id: str = Field(max_length=64)
    dns_provider: str = "manual"
    dns_credentials: dict[str, str] | None = None


class DnsRecordOut(BaseModel):
    """A record the domain needs: ``purpose`` is ``route`` (the domain points at
    the share router) or ``acme-challenge`` (the certificate's DNS-01 proof);
    ``present``: whether its authoritative servers served it at the last check."""

    type: str
    name: str
    value: str
    ttl: int
    purpose: str
    present: bool | None = None


class TxtSetup(BaseModel):
    name: str
    value: str


class CnameSetup(BaseModel):
    name: str
    target: str


class DomainSetup(BaseModel):
    """What to create by hand (the SDK's CLI prints it): the challenge TXT and,
    when the router's public address is a name, the CNAME (an address: ``a_record``)."""

    txt_record: TxtSetup | None = None
    cname: CnameSetup | None = None
    a_record: TxtSetup | None = None
    verify_endpoint: str


class CertificateOut(BaseModel):
    serial: str
    issuer: str
    not_before: datetime
    not_after: datetime


class CustomDomainRecord(BaseModel):
    id: int
    domain: str
    share_id: str
    vm_id: str
    dns_provider: str
    status: str  # pending, verifying, issued, failed
    dns_records: list[DnsRecordOut]
    last_error: str | None
    # What the issuance is doing now, or did last (e.g. "waiting for the ACME server").
    progress: str | None
    setup: DomainSetup
    url: str
    # Why no certificate can be had (e.g. the server has no ACME directory), or null.
    certificates: str | None
    certificate: CertificateOut | None
    created_at: datetime
    updated_at: datetime
    verified_at: datetime | None
    issued_at: datetime | None


class DomainHealth(BaseModel):
    """GET /v1/custom-domains/{id}/health: an HTTPS request through the share
    router with the domain's name, as a browser would make it."""

    healthy: bool
    status_code: int | None
    latency_ms: float | None
    cert_present: bool
    key_present: bool
    # The router answered TLS for the domain with the domain's current certificate.
    proxy_active: bool
    error: str | None = None


class CustomDomainDeleted(BaseModel):
    success: bool = True
    id: int
    # Records Kiln published that it could not remove (the DNS server refused), if any.
    dns_cleanup_error: str | None = None
