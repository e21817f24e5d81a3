"""Wire models of the VM routes.

``VMCreateRequest``, ``VMCreateResponse`` and their parts mirror the founding spec
(shared/seeds/000_0297815c2ba82e2e.txt) to the letter: names, types, titles,
defaults and required lists; tests/unit/test_openapi_seed.py holds them to it.
Server policy (ranges, paths, names) is checked in ``kiln.services.vms`` so that
these schemas stay the seed's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from kiln.schemas.volumes import MountRow, mount_summary

# A free-form JSON object. pydantic would document ``dict[str, Any]`` with
# ``additionalProperties: true``; the seed documents it as a bare object.
JsonObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object"})]


def _schema_as_the_seed(schema: dict[str, Any]) -> None:
    schema.pop("additionalProperties", None)


# A create body's field Kiln does not know is a 422 naming it, never ignored
# (the SDK must not believe a setting took effect that was dropped). pydantic
# would document that as ``additionalProperties: false``; the seed's schemas
# have no such key, so the served document leaves it out: the refusal is the
# server's policy, like its ranges (kiln.services.vm_policy).
REFUSE_UNKNOWN_FIELDS = ConfigDict(extra="forbid", json_schema_extra=_schema_as_the_seed)


class ShareRequest(BaseModel):
    model_config = REFUSE_UNKNOWN_FIELDS

    port: int = Field(ge=1, le=65535)
    is_public: bool = False


class CustomDomainRequest(BaseModel):
    model_config = REFUSE_UNKNOWN_FIELDS

    domain: str
    dns_provider: str | None = None
    dns_credentials: dict[str, str] | None = None


class VMVolumeMountRequest(BaseModel):
    model_config = REFUSE_UNKNOWN_FIELDS

    volume_id: str
    mount_path: str
    mode: str = "rw"
    checkpoint_id: str | None = None


class VMCreateRequest(BaseModel):
    model_config = REFUSE_UNKNOWN_FIELDS

    session_id: str | None = None
    vm_lifetime_seconds: int | None = None
    memory_mb: int | None = None
    vcpu_count: int | None = None
    metadata: JsonObject | None = None
    env: dict[str, str] | None = None
    egress_policy: JsonObject | None = None
    snapshot_id: str | None = None
    snapshot_on_terminate: bool | None = None
    snapshot_name: str | None = None
    share: ShareRequest | None = None
    custom_domain: CustomDomainRequest | None = None
    image_variant: str | None = None
    volumes: list[VMVolumeMountRequest] | None = None
    vault_ids: list[str] | None = None
    # The instavm SDK sends these two with a create; the seed's schema has no
    # such fields, so they are accepted without showing in the OpenAPI document.
    auto_suspend: SkipJsonSchema[bool | None] = None
    auto_resume: SkipJsonSchema[bool | None] = None


class VMCreateResponse(BaseModel):
    vm_id: str | None = None
    session_id: str
    status: str
    share: JsonObject | None = None
    custom_domain: JsonObject | None = None
    env_status: str = "none"
    env_error: str | None = None

    @classmethod
    def from_row(cls, vm: VmRow) -> VMCreateResponse:
        return cls(
            vm_id=vm.id,
            session_id=vm.session_id,
            status=vm.status,
            share=vm.share,
            custom_domain=vm.custom_domain,
            env_status=vm.env_status,
            env_error=vm.env_error,
        )


class VMUpdateRequest(BaseModel):
    """PATCH /v1/vms/{vm_id}: fields left out (or null) stay as they are. An
    unknown field is a 422 naming it: a client must not believe a change made
    that was dropped."""

    model_config = ConfigDict(extra="forbid")

    vm_lifetime_seconds: int | None = None
    # The instavm CLI's `vm update --memory-mb`: known so that it is refused with
    # the reason (kiln.services.vm_policy.check_update), not as an unknown field.
    memory_mb: int | None = None
    snapshot_on_terminate: bool | None = None
    snapshot_name: str | None = None
    metadata: JsonObject | None = None
    vault_ids: list[str] | None = None
    auto_suspend: bool | None = None
    auto_resume: bool | None = None


class VmRow(Protocol):
    """What a VM record is built from (``kiln.store.models.Vm`` has these attributes)."""

    id: str
    session_id: str
    status: str
    vcpu_count: int
    memory_mb: int
    image_variant: str
    labels: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    share: dict[str, Any] | None
    custom_domain: dict[str, Any] | None
    vault_ids: list[str]
    env_status: str
    env_error: str | None
    snapshot_on_terminate: bool
    snapshot_name: str | None
    failure_reason: str | None
    auto_suspend: bool
    auto_resume: bool
    snapshot_id: str | None
    terminate_snapshot_id: str | None
    network_error: str | None

    @property
    def mounts(self) -> Sequence[MountRow]: ...


class VMRecord(BaseModel):
    vm_id: str
    session_id: str
    status: str
    vcpu_count: int
    memory_mb: int
    image_variant: str
    metadata: JsonObject
    created_at: datetime
    expires_at: datetime
    share: JsonObject | None
    custom_domain: JsonObject | None
    volumes: list[JsonObject]
    vault_ids: list[str]
    env_status: str
    env_error: str | None
    snapshot_on_terminate: bool
    snapshot_name: str | None
    failure_reason: str | None
    auto_suspend: bool
    auto_resume: bool
    # The snapshot the VM was created from (create's snapshot_id), if any.
    snapshot_id: str | None = None
    # The snapshot taken when it was terminated (snapshot_on_terminate), if any.
    terminate_snapshot_id: str | None = None
    # Where the SSH gateway takes `ssh <vm_id>@<ssh_host> -p <ssh_port>` (null: no gateway).
    ssh_host: str | None = None
    ssh_port: int | None = None
    # Set when its egress_policy allows something but the host gives it no
    # network at all (it then reaches nothing outside itself): why.
    network_error: str | None = None

    @classmethod
    def from_row(cls, vm: VmRow, ssh: tuple[str, int] | None = None) -> VMRecord:
        return cls(
            ssh_host=ssh[0] if ssh else None,
            ssh_port=ssh[1] if ssh else None,
            vm_id=vm.id,
            session_id=vm.session_id,
            status=vm.status,
            vcpu_count=vm.vcpu_count,
            memory_mb=vm.memory_mb,
            image_variant=vm.image_variant,
            metadata=vm.labels,
            created_at=vm.created_at,
            expires_at=vm.expires_at,
            share=vm.share,
            custom_domain=vm.custom_domain,
            volumes=[mount_summary(mount) for mount in vm.mounts],
            vault_ids=vm.vault_ids,
            env_status=vm.env_status,
            env_error=vm.env_error,
            snapshot_on_terminate=vm.snapshot_on_terminate,
            snapshot_name=vm.snapshot_name,
            failure_reason=vm.failure_reason,
            auto_suspend=vm.auto_suspend,
            auto_resume=vm.auto_resume,
            snapshot_id=vm.snapshot_id,
            terminate_snapshot_id=vm.terminate_snapshot_id,
            network_error=vm.network_error,
        )


class VMDeleteResponse(BaseModel):
    vm_id: str
    status: str
    # The snapshot taken before it went (snapshot_on_terminate), if any.
    snapshot_id: str | None = None


class VMConsoleResponse(BaseModel):
    vm_id: str
    # The last bytes of the serial console, decoded as UTF-8 with replacement.
    output: str
