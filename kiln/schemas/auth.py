"""Wire models of authentication, the account and API keys."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"


class UserResponse(BaseModel):
    id: int
    username: str
    created_at: datetime


class ApiKeyCreateRequest(BaseModel):
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
