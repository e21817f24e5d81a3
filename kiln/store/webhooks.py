"""Queries of webhook endpoints and deliveries.

The user-facing ones take ``owner_id``; the delivery worker's (``*_any_owner``)
read every user's due deliveries, as the worker acts for all of them.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.store.models import WebhookDelivery, WebhookEndpoint

# How many due rows one pass looks at to find one per endpoint.
DUE_SCAN_ROWS = 500


class WebhookRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # -- endpoints

    async def add_endpoint(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        self.session.add(endpoint)
        await self.session.flush()
        return endpoint

    async def endpoints(self, owner_id: int) -> builtins.list[WebhookEndpoint]:
        rows = await self.session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.owner_id == owner_id).order_by(WebhookEndpoint.id)
        )
        return list(rows)

    async def endpoint(self, owner_id: int, endpoint_id: int) -> WebhookEndpoint | None:
        return await self.session.scalar(
            select(WebhookEndpoint).where(WebhookEndpoint.owner_id == owner_id, WebhookEndpoint.id == endpoint_id)
        )

    async def endpoint_any_owner(self, endpoint_id: int) -> WebhookEndpoint | None:
        return await self.session.get(WebhookEndpoint, endpoint_id)

    async def delete_endpoint(self, endpoint: WebhookEndpoint) -> None:
        await self.session.delete(endpoint)

    async def enabled_endpoints(self, owner_id: int) -> builtins.list[WebhookEndpoint]:
        rows = await self.session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.owner_id == owner_id, WebhookEndpoint.enabled.is_(True))
        )
        return list(rows)

    # -- deliveries

    async def add_delivery(self, delivery: WebhookDelivery) -> WebhookDelivery:
        self.session.add(delivery)
        await self.session.flush()
        return delivery

    async def delivery(self, owner_id: int, delivery_id: int) -> WebhookDelivery | None:
        return await self.session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.owner_id == owner_id, WebhookDelivery.id == delivery_id)
        )

    async def deliveries(
        self,
        owner_id: int,
        *,
        endpoint_id: int | None,
        status: str | None,
        event_type: str | None,
        before: int | None,
        limit: int,
    ) -> builtins.list[WebhookDelivery]:
        """Newest first, with an id below ``before``."""
        query = select(WebhookDelivery).where(WebhookDelivery.owner_id == owner_id)
        for column, value in (
            (WebhookDelivery.endpoint_id, endpoint_id),
            (WebhookDelivery.status, status),
            (WebhookDelivery.event_type, event_type),
        ):
            if value is not None:
                query = query.where(column == value)
        if before is not None:
            query = query.where(WebhookDelivery.id < before)
        return list(await self.session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))

    async def due_any_owner(self, now: datetime, limit: int, busy: set[int]) -> builtins.list[WebhookDelivery]:
        """Pending deliveries whose time has come, at most one per endpoint (its
        oldest), none of an endpoint in ``busy`` (one being sent to)."""
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.id)
            .limit(DUE_SCAN_ROWS)
        )
        taken: builtins.list[WebhookDelivery] = []
        endpoints = set(busy)
        for row in await self.session.scalars(query):
            if row.endpoint_id not in endpoints:
                endpoints.add(row.endpoint_id)
                taken.append(row)
                if len(taken) == limit:
                    break
        return taken

    async def delivery_any_owner(self, delivery_id: int) -> WebhookDelivery | None:
        return await self.session.get(WebhookDelivery, delivery_id)

    async def update_delivery_any_owner(self, delivery_id: int, **fields: Any) -> None:
        await self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(**fields)
            .execution_options(synchronize_session=False)
        )

    async def delete_finished_before_any_owner(self, cutoff: datetime) -> int:
        """Deliveries that ended (succeeded or failed) and were made before ``cutoff``."""
        result = await self.session.execute(
            delete(WebhookDelivery).where(
                WebhookDelivery.status.in_(("succeeded", "failed")), WebhookDelivery.created_at < cutoff
            )
        )
        assert isinstance(result, CursorResult)
        return int(result.rowcount)
