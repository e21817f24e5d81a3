"""Webhooks at server start: the service and its delivery worker (which runs
until ``service.worker.stop()``)."""

from __future__ import annotations

from collections.abc import Callable

from kiln.config import Settings
from kiln.crypto.master_key import derive_key, load_master_key
from kiln.services.webhooks.secrets import PURPOSE
from kiln.services.webhooks.service import WebhookService
from kiln.services.webhooks.worker import DeliveryWorker
from kiln.store.db import Database


def start_webhooks(settings: Settings, db: Database, on_outcome: Callable[[str], None] | None = None) -> WebhookService:
    key = derive_key(load_master_key(settings.data_dir, settings.master_key), PURPOSE)
    worker = DeliveryWorker(
        db,
        key,
        poll_seconds=settings.webhook_poll_seconds,
        retry_base_seconds=settings.webhook_retry_base_seconds,
        retry_max_seconds=settings.webhook_retry_max_seconds,
        allow_private=settings.webhook_allow_private,
        on_outcome=on_outcome,
    )
    worker.start()
    return WebhookService(db, key, worker, settings.quota_webhook_endpoints)
