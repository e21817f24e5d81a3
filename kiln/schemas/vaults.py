"""Wire models of the vault routes (API.md "Vaults"; the instavm SDK's shapes win).

Records carry both ``id`` and the resource's own id name (``vault_id``,
``credential_id``, ``service_id``), as InstaVM's answers do. A credential's
value is accepted on create and rotate and never sent back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody

MAX_NAME = 255
MAX_DESCRIPTION = 4096


class VaultCreateRequest(RequestBody):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)


class VaultUpdateRequest(RequestBody):
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)


class CredentialCreateRequest(RequestBody):
    name: str
    value: str  # checked by the service (a 422 that never quotes it)
    credential_type: str = Field(default="api_key", min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)


class CredentialRotateRequest(RequestBody):
    value: str


class ServiceCreateRequest(RequestBody):
    host: str = Field(max_length=MAX_NAME)
    auth_config: dict[str, Any]
    enabled: bool = True
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)


class TemplatesRequest(RequestBody):
    template_ids: list[str] = Field(min_length=1, max_length=64)


# ---- records


class VaultRow(Protocol):
    id: str
    name: str
    description: str | None
    created_at: datetime
    updated_at: datetime


class VaultRecord(BaseModel):
    id: str
    vault_id: str
    name: str
    description: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, vault: VaultRow) -> VaultRecord:
        return cls(
            id=vault.id, vault_id=vault.id, name=vault.name, description=vault.description,
            created_at=vault.created_at, updated_at=vault.updated_at,
        )  # fmt: skip


class VaultList(BaseModel):
    vaults: list[VaultRecord]


class CredentialRow(Protocol):
    id: str
    vault_id: str
    name: str
    credential_type: str
    description: str | None
    created_at: datetime
    rotated_at: datetime | None


class CredentialRecord(BaseModel):
    """A credential's metadata: never its value."""

    id: str
    credential_id: str
    vault_id: str
    name: str
    credential_type: str
    description: str | None
    enabled: bool = True
    created_at: datetime
    rotated_at: datetime | None

    @classmethod
    def from_row(cls, credential: CredentialRow) -> CredentialRecord:
        return cls(
            id=credential.id, credential_id=credential.id, vault_id=credential.vault_id, name=credential.name,
            credential_type=credential.credential_type, description=credential.description,
            created_at=credential.created_at, rotated_at=credential.rotated_at,
        )  # fmt: skip


class CredentialList(BaseModel):
    credentials: list[CredentialRecord]


class ServiceRecord(BaseModel):
    id: str
    service_id: str
    vault_id: str
    host: str
    auth_config: dict[str, Any]
    enabled: bool
    description: str | None
    template_id: str | None
    # The credential auth_config names, and whether the vault holds it now
    # (a service whose credential was deleted injects nothing until it is back).
    credential: str
    credential_present: bool
    created_at: datetime


class ServiceList(BaseModel):
    services: list[ServiceRecord]


class CatalogList(BaseModel):
    templates: list[dict[str, Any]]


class DiscoveredCredential(BaseModel):
    id: str
    name: str
    credential_type: str


class DiscoveredService(BaseModel):
    id: str
    host: str
    auth_type: str
    credential: str
    enabled: bool
    credential_present: bool


class VaultDiscovery(BaseModel):
    """A safe summary: names and hosts, never values."""

    id: str
    vault_id: str
    name: str
    credentials: list[DiscoveredCredential]
    services: list[DiscoveredService]
    hosts: list[str]  # the hosts a VM bound to this vault has credentials injected for now


class CallRow(Protocol):
    id: str
    vm_id: str
    service_id: str
    credential_id: str
    credential_name: str
    host: str
    method: str
    path: str
    status: int | None
    error: str | None
    at: datetime


class CallRecord(BaseModel):
    # API.md's names, and the ones the SDK's CLI reads (timestamp, status_code, credential_name).
    id: str
    host: str
    method: str
    path: str
    status: int | None
    status_code: int | None
    credential: str
    credential_name: str
    credential_id: str
    service_id: str
    vm_id: str
    error: str | None
    at: datetime
    timestamp: datetime
    created_at: datetime

    @classmethod
    def from_row(cls, call: CallRow) -> CallRecord:
        return cls(
            id=call.id, host=call.host, method=call.method, path=call.path, status=call.status,
            status_code=call.status, credential=call.credential_name, credential_name=call.credential_name,
            credential_id=call.credential_id, service_id=call.service_id, vm_id=call.vm_id, error=call.error,
            at=call.at, timestamp=call.at, created_at=call.at,
        )  # fmt: skip


class CallList(BaseModel):
    logs: list[CallRecord]
