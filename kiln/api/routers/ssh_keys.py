"""The account's SSH keys (API.md, "Account"): ``GET/POST /v1/ssh-keys``,
``DELETE /v1/ssh-keys/{key_id}``. A key logs its owner in to the SSH gateway
(``ssh <vm_id>@<ssh_host> -p <ssh_port>``) for every VM the owner has."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from kiln.api.deps import CurrentUser, SshKeys
from kiln.schemas.auth import DeletedResponse
from kiln.schemas.errors import ErrorMessage
from kiln.schemas.ssh_keys import SshKeyCreateRequest, SshKeyList, SshKeyRecord
from kiln.store.models import SshKey

router = APIRouter(prefix="/v1/ssh-keys", tags=["ssh-keys"], responses={401: {"model": ErrorMessage}})

KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _record(key: SshKey) -> SshKeyRecord:
    return SshKeyRecord(
        id=key.id,
        fingerprint=key.fingerprint,
        comment=key.comment,
        key_type=key.key_type,
        public_key=key.public_key,
        created_at=key.created_at,
    )


@router.get("")
async def list_ssh_keys(user: CurrentUser, keys: SshKeys) -> SshKeyList:
    return SshKeyList(keys=[_record(key) for key in await keys.list(user.id)])


@router.post("", responses={409: {"model": ErrorMessage}, 429: {"model": ErrorMessage}})
async def add_ssh_key(body: SshKeyCreateRequest, user: CurrentUser, keys: SshKeys) -> SshKeyRecord:
    return _record(await keys.add(user.id, body.public_key))


@router.delete("/{key_id}", responses={404: {"model": ErrorMessage}})
async def delete_ssh_key(key_id: KeyId, user: CurrentUser, keys: SshKeys) -> DeletedResponse:
    await keys.delete(user.id, key_id)
    return DeletedResponse()
