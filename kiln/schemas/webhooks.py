"""Wire models of webhooks (the instavm SDK's ``client.webhooks``; its CLI's
``webhooks create/list/get/update/delete/verify/rotate-secret/test/deliveries/replay``).

Bodies refuse fields they do not know (``extra="forbid"``): a setting a client
believes it made but the server ignored would be worse than a 422 naming it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody

MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 500
MAX_PATTERNS = 50
MAX_TIMEOUT_SECONDS = 30
MAX_RETRIES = 10

Pattern = Field(min_length=1, max_length=64)


class WebhookEndpointCreate(RequestBody):
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    # fnmatch patterns of event types; none given: every type ("*").
    event_patterns: list[str] | None = Field(default=None, max_length=MAX_PATTERNS)
    timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_SECONDS)
    max_retries: int | None = Field(default=None, ge=0, le=MAX_RETRIES)


class WebhookEndpointUpdate(RequestBody):
    url: str | None = Field(default=None, min_length=1, max_length=MAX_URL_CHARS)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    event_patterns: list[str] | None = Field(default=None, max_length=MAX_PATTERNS)
    timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_SECONDS)
    max_retries: int | None = Field(default=None, ge=0, le=MAX_RETRIES)
    enabled: bool | None = None


class WebhookEndpointRecord(BaseModel):
    id: str
    url: str
    description: str | None
    event_patterns: list[str]
    timeout_seconds: int
    max_retries: int
    # active or disabled
    status: str
    enabled: bool
    # Shown when the endpoint is made and when its secret is rotated, never again.
    secret: str | None = None
    secret_hint: str
    created_at: datetime
    updated_at: datetime
    verified_at: datetime | None


class WebhookAttempt(BaseModel):
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float


class WebhookDeliveryRecord(BaseModel):
    id: str
    endpoint_id: str
    event_id: str | None
    event_type: str
    # pending, succeeded, failed
    status: str
    attempt_count: int
    attempts: list[WebhookAttempt]
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    replay_of: str | None
    created_at: datetime
    delivered_at: datetime | None


class WebhookDeliveryPage(BaseModel):
    items: list[WebhookDeliveryRecord]
    next_cursor: str | None


class WebhookVerification(BaseModel):
    """``POST .../verify``: one signed request sent now, and what the endpoint answered."""

    id: str
    # verified (a 2xx) or failed
    status: str
    status_code: int | None
    error: str | None


class WebhookTestQueued(BaseModel):
    id: str
    delivery_id: str
    status: str
    event: dict[str, Any]
