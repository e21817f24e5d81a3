"""Endpoint secrets at rest: sealed with the master key's ``webhook-secrets``
purpose key, bound to their row; opened only to sign a request."""

from __future__ import annotations

from kiln.crypto.sealing import seal, unseal

PURPOSE = "webhook-secrets"


def _place(endpoint_id: int) -> str:
    return f"webhook_endpoints:{endpoint_id}:secret"


def seal_secret(key: bytes, endpoint_id: int, secret: str) -> str:
    return seal(key, secret.encode(), _place(endpoint_id))


def open_secret(key: bytes, endpoint_id: int, sealed: str) -> str:
    return unseal(key, sealed, _place(endpoint_id)).decode()
