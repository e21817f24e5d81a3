"""``WebhookService``: a user's endpoints and their deliveries (``/v1/webhooks``).

Every call takes ``owner_id``; another user's endpoint or delivery is
``NotFound``. A secret is returned when an endpoint is made and when it is
rotated, never after: the row holds it sealed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.services.errors import InvalidRequest, NotFound, QuotaExceeded
from kiln.services.events.record import NewEvent, by_user, record
from kiln.services.webhooks.fanout import new_delivery
from kiln.services.webhooks.policy import check_patterns, check_url
from kiln.services.webhooks.secrets import open_secret, seal_secret
from kiln.services.webhooks.sender import Attempt, send
from kiln.services.webhooks.signing import hint, new_secret
from kiln.services.webhooks.worker import DeliveryWorker
from kiln.store.db import Database
from kiln.store.models import WebhookDelivery, WebhookEndpoint, utc_now
from kiln.store.webhooks import WebhookRepository

DEFAULT_TIMEOUT_SECONDS = 10
DEFAULT_MAX_RETRIES = 5
UPDATABLE = ("url", "description", "event_patterns", "timeout_seconds", "max_retries", "enabled")


@dataclass(frozen=True)
class EndpointChange:
    """What a create or PATCH asks for (None: not given)."""

    url: str | None = None
    description: str | None = None
    event_patterns: list[str] | None = None
    timeout_seconds: int | None = None
    max_retries: int | None = None
    enabled: bool | None = None


@dataclass(frozen=True)
class WithSecret:
    endpoint: WebhookEndpoint
    secret: str


@dataclass(frozen=True)
class DeliveryPage:
    items: list[WebhookDelivery]
    next_cursor: str | None


@dataclass(frozen=True)
class Verification:
    endpoint_id: int
    attempt: Attempt


class WebhookService:
    def __init__(self, db: Database, key: bytes, worker: DeliveryWorker, max_endpoints: int) -> None:
        self._db = db
        self._key = key
        self.worker = worker
        self._max_endpoints = max_endpoints

    async def create(self, owner_id: int, change: EndpointChange) -> WithSecret:
        assert change.url is not None
        await check_url(change.url, self.worker.allow_private)
        patterns = check_patterns(change.event_patterns)
        secret = new_secret()
        now = utc_now()
        async with self._db.transaction() as session:
            webhooks = WebhookRepository(session)
            held = len(await webhooks.endpoints(owner_id))
            if held >= self._max_endpoints:
                raise QuotaExceeded(
                    f"quota webhook endpoints: you have {held} of {self._max_endpoints} (KILN_QUOTA_WEBHOOK_ENDPOINTS)"
                )
            endpoint = await webhooks.add_endpoint(
                WebhookEndpoint(
                    owner_id=owner_id,
                    url=change.url,
                    description=change.description,
                    event_patterns=patterns,
                    timeout_seconds=change.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
                    max_retries=DEFAULT_MAX_RETRIES if change.max_retries is None else change.max_retries,
                    enabled=True,
                    # Sealed below, once the row has the id the seal is bound to.
                    secret="",
                    secret_hint=hint(secret),
                    created_at=now,
                    updated_at=now,
                )
            )
            endpoint.secret = seal_secret(self._key, endpoint.id, secret)
            await record(session, _endpoint_event(endpoint, "webhook.endpoint_created"))
        return WithSecret(endpoint, secret)

    async def list(self, owner_id: int) -> list[WebhookEndpoint]:
        async with self._db.transaction() as session:
            return await WebhookRepository(session).endpoints(owner_id)

    async def get(self, owner_id: int, endpoint_id: int) -> WebhookEndpoint:
        async with self._db.transaction() as session:
            return await _endpoint(WebhookRepository(session), owner_id, endpoint_id)

    async def update(self, owner_id: int, endpoint_id: int, change: EndpointChange) -> WebhookEndpoint:
        if all(getattr(change, name) is None for name in UPDATABLE):
            raise InvalidRequest.single((), f"name at least one of {', '.join(UPDATABLE)}")
        if change.url is not None:
            await check_url(change.url, self.worker.allow_private)
        patterns = check_patterns(change.event_patterns) if change.event_patterns is not None else None
        async with self._db.transaction() as session:
            endpoint = await _endpoint(WebhookRepository(session), owner_id, endpoint_id)
            for name, value in (
                ("url", change.url),
                ("description", change.description),
                ("event_patterns", patterns),
                ("timeout_seconds", change.timeout_seconds),
                ("max_retries", change.max_retries),
                ("enabled", change.enabled),
            ):
                if value is not None:
                    setattr(endpoint, name, value)
            endpoint.updated_at = utc_now()
        return endpoint

    async def delete(self, owner_id: int, endpoint_id: int) -> None:
        """The endpoint and its deliveries (the audit log keeps that it existed)."""
        async with self._db.transaction() as session:
            webhooks = WebhookRepository(session)
            endpoint = await _endpoint(webhooks, owner_id, endpoint_id)
            await record(session, _endpoint_event(endpoint, "webhook.endpoint_deleted"))
            await webhooks.delete_endpoint(endpoint)

    async def rotate_secret(self, owner_id: int, endpoint_id: int) -> WithSecret:
        """A new secret at once: deliveries signed from now on use it (there is no overlap)."""
        secret = new_secret()
        async with self._db.transaction() as session:
            endpoint = await _endpoint(WebhookRepository(session), owner_id, endpoint_id)
            endpoint.secret = seal_secret(self._key, endpoint.id, secret)
            endpoint.secret_hint = hint(secret)
            endpoint.updated_at = utc_now()
        return WithSecret(endpoint, secret)

    async def send_test(self, owner_id: int, endpoint_id: int) -> WebhookDelivery:
        """A ``webhook.test`` event, in the audit log, delivered to this endpoint only."""
        async with self._db.transaction() as session:
            webhooks = WebhookRepository(session)
            endpoint = await _endpoint(webhooks, owner_id, endpoint_id)
            event = await record(session, _endpoint_event(endpoint, "webhook.test"))
            delivery = await webhooks.add_delivery(new_delivery(endpoint, event))
        self.worker.nudge()
        return delivery

    async def verify(self, owner_id: int, endpoint_id: int) -> Verification:
        """One signed ``webhook.verify`` request now, in this call; a 2xx marks the endpoint verified."""
        endpoint = await self.get(owner_id, endpoint_id)
        body = {
            "id": f"verify-{endpoint.id}",
            "event_group": "webhook",
            "event_type": "webhook.verify",
            "user_id": owner_id,
            "event_payload": {"endpoint_id": str(endpoint.id)},
            "created_at": utc_now().isoformat(),
        }
        attempt = await send(
            self.worker.http,
            endpoint.url,
            open_secret(self._key, endpoint.id, endpoint.secret),
            body,
            delivery_id=f"verify-{endpoint.id}",
            timeout=float(endpoint.timeout_seconds),
            allow_private=self.worker.allow_private,
        )
        if attempt.succeeded:
            async with self._db.transaction() as session:
                row = await _endpoint(WebhookRepository(session), owner_id, endpoint_id)
                row.verified_at = utc_now()
        return Verification(endpoint.id, attempt)

    async def deliveries(
        self,
        owner_id: int,
        *,
        endpoint_id: int | None,
        status: str | None,
        event_type: str | None,
        before: int | None,
        limit: int,
    ) -> DeliveryPage:
        async with self._db.transaction() as session:
            rows = await WebhookRepository(session).deliveries(
                owner_id, endpoint_id=endpoint_id, status=status, event_type=event_type, before=before, limit=limit + 1
            )
        more = len(rows) > limit
        rows = rows[:limit]
        return DeliveryPage(rows, str(rows[-1].id) if more else None)

    async def replay(self, owner_id: int, delivery_id: int) -> WebhookDelivery:
        """The same event again, as a new delivery (the old one keeps its history)."""
        async with self._db.transaction() as session:
            webhooks = WebhookRepository(session)
            old = await webhooks.delivery(owner_id, delivery_id)
            if old is None:
                raise NotFound(f"delivery {delivery_id} not found")
            now = utc_now()
            again = await webhooks.add_delivery(
                WebhookDelivery(
                    owner_id=owner_id,
                    endpoint_id=old.endpoint_id,
                    event_id=old.event_id,
                    event_type=old.event_type,
                    body=old.body,
                    status="pending",
                    attempt_count=0,
                    next_attempt_at=now,
                    attempts=[],
                    replay_of=old.id,
                    created_at=now,
                )
            )
        self.worker.nudge()
        return again


async def _endpoint(webhooks: WebhookRepository, owner_id: int, endpoint_id: int) -> WebhookEndpoint:
    endpoint = await webhooks.endpoint(owner_id, endpoint_id)
    if endpoint is None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    return endpoint


def _endpoint_event(endpoint: WebhookEndpoint, event_type: str) -> NewEvent:
    # The URL is left out: a query string may carry the receiver's own token.
    payload = {"event_patterns": endpoint.event_patterns}
    return NewEvent(
        event_type,
        endpoint.owner_id,
        resource_type="webhook_endpoint",
        resource_id=str(endpoint.id),
        payload=payload,
        **by_user(endpoint.owner_id),
    )
