"""Wire models of authentication, the account and API keys."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from kiln.schemas.bodies import RequestBody


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"


class UserResponse(BaseModel):
    id: int
    username: str
    # InstaVM's account keys, read by the SDK's CLI (whoami, login). Kiln's users
    # are made by the operator: no e-mail address, the name is the username, and
    # nobody is left to verify them.
    email: str | None = None
    name: str
    is_verified: bool = True
    created_at: datetime


class ApiKeyUpdateRequest(RequestBody):
    """``PATCH /v1/api-keys/{id}``: a key's name is all that may change."""

    name: str


class ApiKeyCreateRequest(RequestBody):
    name: str | None = None


class ApiKeyResponse(BaseModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


class ApiKeyCreatedResponse(ApiKeyResponse):
    # The secret: shown in this response only, never again.
    key: str


class DeletedResponse(BaseModel):
    success: bool = True
