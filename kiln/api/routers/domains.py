"""Custom-domain routes (API.md, "Networking"; the instavm SDK's ``custom_domains``).

A domain's ``url`` is served by the share router over HTTPS once its
certificate is issued. Another user's domain is 404; a domain claimed by anyone
already is 409. ``dns_credentials`` are never returned.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from kiln.api.deps import CurrentUser, Domains
from kiln.schemas.domains import CustomDomainCreateRequest, CustomDomainDeleted, CustomDomainRecord, DomainHealth
from kiln.schemas.errors import ErrorMessage, error_responses

router = APIRouter(prefix="/v1/custom-domains", tags=["custom domains"], responses={401: {"model": ErrorMessage}})

NOT_FOUND = error_responses(404, 409)
# Ids are the database's (an integer, as the SDK's CLI takes them); out of range is a 422, not a 500.
DomainId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post("", responses=error_responses(404, 409, 429))
async def create_custom_domain(
    body: CustomDomainCreateRequest, user: CurrentUser, domains: Domains
) -> CustomDomainRecord:
    return await domains.create(user.id, body)


@router.get("")
async def list_custom_domains(user: CurrentUser, domains: Domains) -> list[CustomDomainRecord]:
    return await domains.list(user.id)


@router.get("/{domain_id}", responses=NOT_FOUND)
async def get_custom_domain(domain_id: DomainId, user: CurrentUser, domains: Domains) -> CustomDomainRecord:
    return await domains.get(user.id, domain_id)


@router.delete("/{domain_id}", responses=NOT_FOUND)
async def delete_custom_domain(domain_id: DomainId, user: CurrentUser, domains: Domains) -> CustomDomainDeleted:
    return await domains.delete(user.id, domain_id)


@router.post("/{domain_id}/verify", responses=NOT_FOUND)
async def verify_custom_domain(domain_id: DomainId, user: CurrentUser, domains: Domains) -> CustomDomainRecord:
    return await domains.verify(user.id, domain_id)


@router.get("/{domain_id}/health", responses=NOT_FOUND)
async def custom_domain_health(domain_id: DomainId, user: CurrentUser, domains: Domains) -> DomainHealth:
    return await domains.health(user.id, domain_id)
