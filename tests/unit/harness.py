"""Helpers for tests that drive the API through an in-process app."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx

# The ``run_app`` fixture: ``async with run_app() as client`` starts an app.
AppRunner = Callable[[], AbstractAsyncContextManager[httpx.AsyncClient]]


def key_headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def bearer_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
