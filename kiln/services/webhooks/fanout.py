"""From an event to its deliveries, in the event's own transaction.

Each enabled endpoint of the event's owner whose patterns match gets a
``pending`` delivery row, due now. Made here, with the event, a delivery
cannot be lost by a crash after the event commits, nor exist for an event
that was rolled back; the worker finds it at its next pass, after a restart too.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kiln.services.webhooks.policy import UNROUTED_GROUPS, matches
from kiln.store.models import Event, WebhookDelivery, WebhookEndpoint, utc_now
from kiln.store.webhooks import WebhookRepository


def event_body(event: Event) -> dict[str, Any]:
    """What a receiver gets: the audit record of the event."""
    return {
        "id": str(event.id),
        "event_group": event.event_group,
        "event_type": event.event_type,
        "status": event.status,
        "user_id": event.owner_id,
        "actor_type": event.actor_type,
        "actor_id": event.actor_id,
        "vm_id": event.vm_id,
        "session_id": event.session_id,
        "resource_type": event.resource_type,
        "resource_id": event.resource_id,
        "event_payload": event.payload or {},
        "error_message": event.error_message,
        "created_at": event.created_at.isoformat(),
    }


def new_delivery(endpoint: WebhookEndpoint, event: Event) -> WebhookDelivery:
    now = utc_now()
    return WebhookDelivery(
        owner_id=endpoint.owner_id,
        endpoint_id=endpoint.id,
        event_id=event.id,
        event_type=event.event_type,
        body=event_body(event),
        status="pending",
        attempt_count=0,
        next_attempt_at=now,
        attempts=[],
        created_at=now,
    )


async def fan_out(session: AsyncSession, event: Event) -> int:
    """Deliveries made for ``event`` (flushed, so it has its id)."""
    if event.owner_id is None or event.event_group in UNROUTED_GROUPS:
        return 0
    webhooks = WebhookRepository(session)
    made = 0
    for endpoint in await webhooks.enabled_endpoints(event.owner_id):
        if matches(endpoint.event_patterns, event.event_type):
            await webhooks.add_delivery(new_delivery(endpoint, event))
            made += 1
    return made
