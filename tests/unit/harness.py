"""Helpers for tests that drive the API through an in-process app."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx

from kiln.config import Settings
from kiln.services.users import UserService
from kiln.store.db import Database

# The ``run_app`` fixture: ``async with run_app() as client`` starts an app.
AppRunner = Callable[[], AbstractAsyncContextManager[httpx.AsyncClient]]


def key_headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def bearer_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def add_user(settings: Settings, username: str, password: str | None = None) -> str:
    """What ``kiln users create`` + ``kiln keys create`` do, next to a running server."""
    db = Database(settings.database)
    try:
        users = UserService(db)
        user = await users.create_user(username, password)
        return (await users.create_api_key(user.id)).key
    finally:
        await db.close()
