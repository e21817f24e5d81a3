"""The delivery worker: sends due deliveries outside any request, retries with backoff.

A pass (every ``KILN_WEBHOOK_POLL_SECONDS``, and again at once while there was
work) takes the oldest due delivery of each endpoint and sends up to
``CONCURRENCY`` at once: one endpoint gets one request at a time, its events in
the order they happened (a delivery waiting for its retry lets the later ones by). Each
attempt is recorded on its row: a 2xx ends it ``succeeded``; anything else
(an error status, a refused address, no answer within the endpoint's
``timeout_seconds``) schedules the next attempt after
``KILN_WEBHOOK_RETRY_BASE_SECONDS * 2^(attempts-1)`` (at most
``KILN_WEBHOOK_RETRY_MAX_SECONDS``) until ``1 + max_retries`` attempts were
made, then ``failed``. The rows are the queue: a restart, or a ``kill -9``,
loses nothing; a send in flight at a crash is sent again (at least once: the
``InstaVM-Delivery-Id`` header lets a receiver drop a repeat).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

import httpx

from kiln.crypto.sealing import SealError
from kiln.services.webhooks.secrets import open_secret
from kiln.services.webhooks.sender import Attempt, new_client, send
from kiln.store.db import Database
from kiln.store.models import WebhookDelivery, utc_now
from kiln.store.webhooks import WebhookRepository

log = logging.getLogger(__name__)

CONCURRENCY = 8


class DeliveryWorker:
    def __init__(
        self,
        db: Database,
        key: bytes,
        *,
        poll_seconds: float,
        retry_base_seconds: float,
        retry_max_seconds: float,
        allow_private: bool,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self._db = db
        self._key = key
        self._poll = poll_seconds
        self._base = retry_base_seconds
        self._max = retry_max_seconds
        self.allow_private = allow_private
        self._on_outcome = on_outcome
        # Endpoints being sent to: one delivery at a time each, so an endpoint gets its events in order.
        self._busy: set[int] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = new_client()
        return self._http

    def start(self) -> None:
        self._loop = asyncio.create_task(self._forever(), name="webhook-deliveries")

    def nudge(self) -> None:
        """Look now rather than at the next poll (a test or replay just queued one)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def backoff(self, attempts: int) -> float:
        return float(min(self._base * 2 ** max(attempts - 1, 0), self._max))

    async def run_once(self) -> int:
        """One pass; how many deliveries were attempted."""
        async with self._db.transaction() as session:
            due = await WebhookRepository(session).due_any_owner(utc_now(), CONCURRENCY, self._busy)
        if not due:
            return 0
        self._busy.update(delivery.endpoint_id for delivery in due)
        try:
            await asyncio.gather(*(self._deliver(delivery) for delivery in due))
        finally:
            self._busy.difference_update(delivery.endpoint_id for delivery in due)
        return len(due)

    async def _forever(self) -> None:
        while True:
            try:
                while await self.run_once():
                    pass
            except Exception:
                log.exception("a webhook delivery pass failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        async with self._db.transaction() as session:
            endpoint = await WebhookRepository(session).endpoint_any_owner(delivery.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            await self._finish(delivery, Attempt(None, "the endpoint is disabled", 0.0), final=True)
            return
        try:
            secret = open_secret(self._key, endpoint.id, endpoint.secret)
        except SealError:
            # Never the secret itself in a log line; only that it would not open.
            log.error("webhook endpoint %s: its secret does not open with this master key", endpoint.id)
            await self._finish(delivery, Attempt(None, "the endpoint's secret cannot be opened", 0.0), final=True)
            return
        attempt = await send(
            self.http,
            endpoint.url,
            secret,
            delivery.body,
            delivery_id=str(delivery.id),
            timeout=float(endpoint.timeout_seconds),
            allow_private=self.allow_private,
        )
        await self._finish(delivery, attempt, final=delivery.attempt_count + 1 > endpoint.max_retries)

    async def _finish(self, delivery: WebhookDelivery, attempt: Attempt, *, final: bool) -> None:
        count = delivery.attempt_count + 1
        fields: dict[str, object] = {
            "attempt_count": count,
            "attempts": [*delivery.attempts, attempt.as_row()],
            "last_status_code": attempt.status_code,
            "last_error": attempt.error,
        }
        if attempt.succeeded:
            outcome = "succeeded"
            fields.update(status="succeeded", delivered_at=utc_now(), next_attempt_at=None)
        elif final:
            outcome = "failed"
            fields.update(status="failed", next_attempt_at=None)
        else:
            outcome = "retried"
            fields["next_attempt_at"] = utc_now() + timedelta(seconds=self.backoff(count))
        async with self._db.transaction() as session:
            await WebhookRepository(session).update_delivery_any_owner(delivery.id, **fields)
        log.info(
            "webhook delivery %s (%s) attempt %d: %s", delivery.id, delivery.event_type, count, attempt.status_code
        )
        if self._on_outcome is not None:
            self._on_outcome(outcome)
