from typing import Annotated

from fastapi import APIRouter, Path

from kiln.api.deps import CurrentUser, Users
from kiln.schemas.auth import (
    ApiKeyCreatedResponse,
    ApiKeyCreateRequest,
    ApiKeyResponse,
    ApiKeyUpdateRequest,
    DeletedResponse,
)
from kiln.schemas.errors import ErrorMessage
from kiln.store.models import ApiKey

router = APIRouter(
    prefix="/v1/api-keys", tags=["api-keys"], responses={401: {"model": ErrorMessage}}
)

# Ids are database integers; anything larger cannot exist (and would overflow the driver).
KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _key_response(key: ApiKey) -> ApiKeyResponse:
    return ApiKeyResponse(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
    )


@router.get("/")
async def list_api_keys(user: CurrentUser, users: Users) -> list[ApiKeyResponse]:
    return [_key_response(key) for key in await users.list_api_keys(user.id)]


@router.post("/")
async def create_api_key(
    body: ApiKeyCreateRequest, user: CurrentUser, users: Users
) -> ApiKeyCreatedResponse:
    """A new key for the calling user; the key itself is in this answer only."""
    created = await users.create_api_key(user.id, body.name)
    return ApiKeyCreatedResponse(**_key_response(created.record).model_dump(), key=created.key)


@router.get("/{key_id}", responses={404: {"model": ErrorMessage}})
async def get_api_key(key_id: KeyId, user: CurrentUser, users: Users) -> ApiKeyResponse:
    return _key_response(await users.get_api_key(user.id, key_id))


@router.patch("/{key_id}", responses={404: {"model": ErrorMessage}})
async def update_api_key(
    key_id: KeyId, body: ApiKeyUpdateRequest, user: CurrentUser, users: Users
) -> ApiKeyResponse:
    """Renames the key; the secret itself never changes (make a new key instead)."""
    return _key_response(await users.rename_api_key(user.id, key_id, body.name))


@router.delete("/{key_id}", responses={404: {"model": ErrorMessage}})
async def delete_api_key(key_id: KeyId, user: CurrentUser, users: Users) -> DeletedResponse:
    await users.delete_api_key(user.id, key_id)
    return DeletedResponse()
