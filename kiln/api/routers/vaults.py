"""Vault routes (API.md "Vaults"; every vault method of the instavm SDK).

A vault holds credentials (their values sealed at rest, never sent back) and
services (a host and how a credential goes into requests to it). A VM created
or patched with ``vault_ids`` has its requests to those hosts intercepted by
the egress proxy, which adds the credential: the guest never holds it. Another
user's vault is a 404. ``GET /v1/vaults/catalog`` is routed before
``/v1/vaults/{vault_id}``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kiln.api.deps import CurrentUser, VaultCalls, Vaults
from kiln.schemas.errors import error_responses
from kiln.schemas.snapshots import SuccessResponse
from kiln.schemas.vaults import (
    CallList,
    CallRecord,
    CatalogList,
    CredentialCreateRequest,
    CredentialList,
    CredentialRecord,
    CredentialRotateRequest,
    ServiceCreateRequest,
    ServiceList,
    ServiceRecord,
    TemplatesRequest,
    VaultCreateRequest,
    VaultDiscovery,
    VaultList,
    VaultRecord,
    VaultUpdateRequest,
)
from kiln.vault import catalog

router = APIRouter(prefix="/v1/vaults", tags=["vaults"])

NOT_FOUND = error_responses(404)
NOT_FOUND_OR_CONFLICT = error_responses(404, 409)


@router.get("/catalog")
async def get_catalog(user: CurrentUser) -> CatalogList:
    return CatalogList(templates=[template.to_wire() for template in catalog.CATALOG])


@router.get("")
async def list_vaults(user: CurrentUser, vaults: Vaults) -> VaultList:
    return VaultList(vaults=[VaultRecord.from_row(vault) for vault in await vaults.list_vaults(user.id)])


@router.post("")
async def create_vault(body: VaultCreateRequest, user: CurrentUser, vaults: Vaults) -> VaultRecord:
    return VaultRecord.from_row(await vaults.create(user.id, body.name, body.description))


@router.get("/{vault_id}", responses=NOT_FOUND)
async def get_vault(vault_id: str, user: CurrentUser, vaults: Vaults) -> VaultRecord:
    return VaultRecord.from_row(await vaults.get(user.id, vault_id))


@router.patch("/{vault_id}", responses=NOT_FOUND)
async def update_vault(vault_id: str, body: VaultUpdateRequest, user: CurrentUser, vaults: Vaults) -> VaultRecord:
    return VaultRecord.from_row(await vaults.update(user.id, vault_id, body.model_dump(exclude_none=True)))


@router.delete("/{vault_id}", responses=NOT_FOUND)
async def delete_vault(vault_id: str, user: CurrentUser, vaults: Vaults) -> SuccessResponse:
    await vaults.delete(user.id, vault_id)
    return SuccessResponse()


@router.get("/{vault_id}/discover", responses=NOT_FOUND)
async def discover_vault(vault_id: str, user: CurrentUser, vaults: Vaults) -> VaultDiscovery:
    return VaultDiscovery.model_validate(await vaults.discover(user.id, vault_id))


# ---- credentials


@router.get("/{vault_id}/credentials", responses=NOT_FOUND)
async def list_credentials(vault_id: str, user: CurrentUser, vaults: Vaults) -> CredentialList:
    credentials = await vaults.list_credentials(user.id, vault_id)
    return CredentialList(credentials=[CredentialRecord.from_row(credential) for credential in credentials])


@router.post("/{vault_id}/credentials", responses=NOT_FOUND_OR_CONFLICT)
async def add_credential(
    vault_id: str, body: CredentialCreateRequest, user: CurrentUser, vaults: Vaults
) -> CredentialRecord:
    credential = await vaults.add_credential(
        user.id, vault_id, body.name, body.value, body.credential_type, body.description
    )
    return CredentialRecord.from_row(credential)


@router.post("/{vault_id}/credentials/{credential_id}/rotate", responses=NOT_FOUND)
async def rotate_credential(
    vault_id: str, credential_id: str, body: CredentialRotateRequest, user: CurrentUser, vaults: Vaults
) -> CredentialRecord:
    return CredentialRecord.from_row(await vaults.rotate_credential(user.id, vault_id, credential_id, body.value))


@router.delete("/{vault_id}/credentials/{credential_id}", responses=NOT_FOUND)
async def delete_credential(vault_id: str, credential_id: str, user: CurrentUser, vaults: Vaults) -> SuccessResponse:
    await vaults.delete_credential(user.id, vault_id, credential_id)
    return SuccessResponse()


# ---- services


@router.get("/{vault_id}/services", responses=NOT_FOUND)
async def list_services(vault_id: str, user: CurrentUser, vaults: Vaults) -> ServiceList:
    services = await vaults.list_services(user.id, vault_id)
    return ServiceList(services=[ServiceRecord.model_validate(service) for service in services])


@router.post("/{vault_id}/services", responses=NOT_FOUND_OR_CONFLICT)
async def add_service(vault_id: str, body: ServiceCreateRequest, user: CurrentUser, vaults: Vaults) -> ServiceRecord:
    service = await vaults.add_service(
        user.id, vault_id, body.host, body.auth_config, body.enabled, body.description
    )
    return ServiceRecord.model_validate(vaults.describe(service, await _names(vaults, user.id, vault_id)))


@router.post("/{vault_id}/services:from_template", responses=NOT_FOUND_OR_CONFLICT)
async def add_services_from_templates(
    vault_id: str, body: TemplatesRequest, user: CurrentUser, vaults: Vaults
) -> ServiceList:
    made = await vaults.add_from_templates(user.id, vault_id, body.template_ids)
    names = await _names(vaults, user.id, vault_id)
    return ServiceList(services=[ServiceRecord.model_validate(vaults.describe(service, names)) for service in made])


@router.delete("/{vault_id}/services/{service_id}", responses=NOT_FOUND)
async def delete_service(vault_id: str, service_id: str, user: CurrentUser, vaults: Vaults) -> SuccessResponse:
    await vaults.delete_service(user.id, vault_id, service_id)
    return SuccessResponse()


# ---- the calls credentials went into


@router.get("/{vault_id}/request-logs", responses=NOT_FOUND)
async def request_logs(
    vault_id: str,
    user: CurrentUser,
    calls: VaultCalls,
    limit: Annotated[int, Query(ge=1, le=1000, description="Newest first, at most this many")] = 100,
) -> CallList:
    return CallList(logs=[CallRecord.from_row(call) for call in await calls.recent(user.id, vault_id, limit)])


async def _names(vaults: Vaults, owner_id: int, vault_id: str) -> set[str]:
    return {credential.name for credential in await vaults.list_credentials(owner_id, vault_id)}
