"""Webhooks (``client.webhooks`` of the SDK): endpoints under
``/v1/webhooks/endpoints`` (create, list, get, PATCH, delete, ``rotate-secret``,
``test``, ``verify``) and ``/v1/webhooks/deliveries`` (list, ``replay``).
Ids are integers in the path, strings in the answers (as the SDK passes them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from kiln.api.deps import CurrentUser, get_services
from kiln.api.errors import validation_error
from kiln.schemas.auth import DeletedResponse
from kiln.schemas.errors import ErrorMessage
from kiln.schemas.webhooks import (
    WebhookAttempt,
    WebhookDeliveryPage,
    WebhookDeliveryRecord,
    WebhookEndpointCreate,
    WebhookEndpointRecord,
    WebhookEndpointUpdate,
    WebhookTestQueued,
    WebhookVerification,
)
from kiln.services.webhooks.service import EndpointChange, WebhookService
from kiln.store.models import WebhookDelivery, WebhookEndpoint

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses={401: {"model": ErrorMessage}})

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
DELIVERY_PARAMETERS = frozenset({"endpoint_id", "status", "event_type", "cursor", "limit"})
DELIVERY_STATUSES = ("pending", "succeeded", "failed")
MAX_PAGE = 200


def get_webhooks(request: Request) -> WebhookService:
    return get_services(request).webhooks


Webhooks = Annotated[WebhookService, Depends(get_webhooks)]


def endpoint_record(endpoint: WebhookEndpoint, secret: str | None = None) -> WebhookEndpointRecord:
    return WebhookEndpointRecord(
        id=str(endpoint.id),
        url=endpoint.url,
        description=endpoint.description,
        event_patterns=endpoint.event_patterns,
        timeout_seconds=endpoint.timeout_seconds,
        max_retries=endpoint.max_retries,
        status="active" if endpoint.enabled else "disabled",
        enabled=endpoint.enabled,
        secret=secret,
        secret_hint=endpoint.secret_hint,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
        verified_at=endpoint.verified_at,
    )


def delivery_record(delivery: WebhookDelivery) -> WebhookDeliveryRecord:
    return WebhookDeliveryRecord(
        id=str(delivery.id),
        endpoint_id=str(delivery.endpoint_id),
        event_id=str(delivery.event_id) if delivery.event_id is not None else None,
        event_type=delivery.event_type,
        status=delivery.status,
        attempt_count=delivery.attempt_count,
        attempts=[WebhookAttempt.model_validate(attempt) for attempt in delivery.attempts or []],
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        next_attempt_at=delivery.next_attempt_at,
        replay_of=str(delivery.replay_of) if delivery.replay_of is not None else None,
        created_at=delivery.created_at,
        delivered_at=delivery.delivered_at,
    )


def _change(body: WebhookEndpointCreate | WebhookEndpointUpdate) -> EndpointChange:
    return EndpointChange(**body.model_dump(exclude_unset=True))


@router.post("/endpoints", responses={422: {}, 429: {"model": ErrorMessage}})
async def create_endpoint(body: WebhookEndpointCreate, user: CurrentUser, webhooks: Webhooks) -> WebhookEndpointRecord:
    made = await webhooks.create(user.id, _change(body))
    return endpoint_record(made.endpoint, made.secret)


@router.get("/endpoints")
async def list_endpoints(user: CurrentUser, webhooks: Webhooks) -> list[WebhookEndpointRecord]:
    return [endpoint_record(endpoint) for endpoint in await webhooks.list(user.id)]


@router.get("/endpoints/{endpoint_id}", responses={404: {"model": ErrorMessage}})
async def get_endpoint(endpoint_id: Id, user: CurrentUser, webhooks: Webhooks) -> WebhookEndpointRecord:
    return endpoint_record(await webhooks.get(user.id, endpoint_id))


@router.patch("/endpoints/{endpoint_id}", responses={404: {"model": ErrorMessage}})
async def update_endpoint(
    endpoint_id: Id, body: WebhookEndpointUpdate, user: CurrentUser, webhooks: Webhooks
) -> WebhookEndpointRecord:
    return endpoint_record(await webhooks.update(user.id, endpoint_id, _change(body)))


@router.delete("/endpoints/{endpoint_id}", responses={404: {"model": ErrorMessage}})
async def delete_endpoint(endpoint_id: Id, user: CurrentUser, webhooks: Webhooks) -> DeletedResponse:
    await webhooks.delete(user.id, endpoint_id)
    return DeletedResponse()


@router.post("/endpoints/{endpoint_id}/rotate-secret", responses={404: {"model": ErrorMessage}})
async def rotate_secret(endpoint_id: Id, user: CurrentUser, webhooks: Webhooks) -> WebhookEndpointRecord:
    rotated = await webhooks.rotate_secret(user.id, endpoint_id)
    return endpoint_record(rotated.endpoint, rotated.secret)


@router.post("/endpoints/{endpoint_id}/test", responses={404: {"model": ErrorMessage}})
async def send_test_event(endpoint_id: Id, user: CurrentUser, webhooks: Webhooks) -> WebhookTestQueued:
    delivery = await webhooks.send_test(user.id, endpoint_id)
    return WebhookTestQueued(
        id=str(endpoint_id), delivery_id=str(delivery.id), status=delivery.status, event=delivery.body
    )


@router.post("/endpoints/{endpoint_id}/verify", responses={404: {"model": ErrorMessage}})
async def verify_endpoint(endpoint_id: Id, user: CurrentUser, webhooks: Webhooks) -> WebhookVerification:
    verification = await webhooks.verify(user.id, endpoint_id)
    attempt = verification.attempt
    return WebhookVerification(
        id=str(endpoint_id),
        status="verified" if attempt.succeeded else "failed",
        status_code=attempt.status_code,
        error=attempt.error,
    )


@router.get("/deliveries", responses={422: {"description": "a filter or cursor this server does not know"}})
async def list_deliveries(
    request: Request,
    user: CurrentUser,
    webhooks: Webhooks,
    endpoint_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    event_type: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=18)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> WebhookDeliveryPage:
    for name in request.query_params:
        if name not in DELIVERY_PARAMETERS:
            raise validation_error(loc=("query", name), msg=f"unknown filter {name!r}")
    if status is not None and status not in DELIVERY_STATUSES:
        raise validation_error(loc=("query", "status"), msg=f"one of {', '.join(DELIVERY_STATUSES)}")
    if cursor and not cursor.isdigit():
        raise validation_error(loc=("query", "cursor"), msg="not a cursor of this server (pass next_cursor back)")
    page = await webhooks.deliveries(
        user.id,
        endpoint_id=endpoint_id,
        status=status,
        event_type=event_type,
        before=int(cursor) if cursor else None,
        limit=limit,
    )
    return WebhookDeliveryPage(items=[delivery_record(item) for item in page.items], next_cursor=page.next_cursor)


@router.post("/deliveries/{delivery_id}/replay", responses={404: {"model": ErrorMessage}})
async def replay_delivery(delivery_id: Id, user: CurrentUser, webhooks: Webhooks) -> WebhookDeliveryRecord:
    return delivery_record(await webhooks.replay(user.id, delivery_id))
