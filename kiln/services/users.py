"""Users and their API keys."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from kiln.services.auth import (
    API_KEY_CACHE_SECONDS,
    API_KEY_DISPLAY_CHARS,
    ApiKeyCache,
    hash_api_key,
    hash_password_off_loop,
    new_api_key,
)
from kiln.services.errors import Conflict, InvalidRequest, NotFound
from kiln.services.events.record import NewEvent, by_user
from kiln.services.events.record import record as record_event
from kiln.store.db import Database
from kiln.store.models import ApiKey, User
from kiln.store.repositories import ApiKeyRepository, UserRepository

ADMIN_USERNAME = "admin"
# How long a key revoked by another process may still work in a running server.
REVOCATION_DELAY_SECONDS = API_KEY_CACHE_SECONDS
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_KEY_NAME_LENGTH = 128


@dataclass(frozen=True)
class CreatedApiKey:
    record: ApiKey
    key: str  # the secret itself: returned once, never stored


class UserService:
    def __init__(self, db: Database, key_cache: ApiKeyCache | None = None) -> None:
        self._db = db
        # The server's cache of authenticated keys (AuthService.key_cache), if any.
        self._key_cache = key_cache

    async def create_user(self, username: str, password: str | None = None) -> User:
        if not USERNAME_PATTERN.fullmatch(username):
            raise InvalidRequest.single(
                ("username",), "must be 1-64 letters, digits, '_', '.' or '-'"
            )
        password_hash = await hash_password_off_loop(password) if password else None
        try:
            async with self._db.transaction() as session:
                return await UserRepository(session).add(username, password_hash)
        except IntegrityError:
            raise Conflict(f"user {username!r} already exists") from None

    async def set_password(self, username: str, password: str) -> User:
        """``kiln users passwd``. Bearer tokens issued before stay valid until they expire."""
        if not password:
            raise InvalidRequest.single(("password",), "must not be empty")
        password_hash = await hash_password_off_loop(password)
        async with self._db.transaction() as session:
            user = await UserRepository(session).by_username(username)
            if user is None:
                raise NotFound(f"user {username!r} not found")
            user.password_hash = password_hash
            return user

    async def get_user(self, user_id: int) -> User:
        async with self._db.transaction() as session:
            user = await UserRepository(session).by_id(user_id)
        if user is None:
            raise NotFound(f"user {user_id} not found")
        return user

    async def get_user_by_name(self, username: str) -> User:
        async with self._db.transaction() as session:
            user = await UserRepository(session).by_username(username)
        if user is None:
            raise NotFound(f"user {username!r} not found")
        return user

    async def visible_owners(self, viewer: User, only: int | None = None) -> list[User]:
        """Whose resources ``viewer`` may list: the admin everyone's (or the one
        user ``only`` names), anyone else only their own, whatever ``only`` says."""
        if viewer.username != ADMIN_USERNAME:
            return [viewer]
        if only is not None:
            return [await self.get_user(only)]
        async with self._db.transaction() as session:
            return await UserRepository(session).list_all()

    async def create_api_key(self, owner_id: int, name: str | None = None) -> CreatedApiKey:
        name = _check_key_name(name or "default")
        key = new_api_key()
        async with self._db.transaction() as session:
            record = await ApiKeyRepository(session).add(
                owner_id, name, key[:API_KEY_DISPLAY_CHARS], hash_api_key(key)
            )
            await record_event(session, _key_event(record, "api_key.created"))
        return CreatedApiKey(record, key)

    async def list_api_keys(self, owner_id: int) -> list[ApiKey]:
        async with self._db.transaction() as session:
            return await ApiKeyRepository(session).list(owner_id)

    async def get_api_key(self, owner_id: int, key_id: int) -> ApiKey:
        async with self._db.transaction() as session:
            key = await ApiKeyRepository(session).get(owner_id, key_id)
        if key is None:
            raise NotFound(f"api key {key_id} not found")
        return key

    async def rename_api_key(self, owner_id: int, key_id: int, name: str) -> ApiKey:
        name = _check_key_name(name)
        async with self._db.transaction() as session:
            key = await ApiKeyRepository(session).get(owner_id, key_id)
            if key is None:
                raise NotFound(f"api key {key_id} not found")
            key.name = name
            await session.flush()
        return key

    async def delete_api_key(self, owner_id: int, key_id: int) -> None:
        async with self._db.transaction() as session:
            keys = ApiKeyRepository(session)
            key = await keys.get(owner_id, key_id)
            if key is None:
                raise NotFound(f"api key {key_id} not found")
            await keys.delete(key)
            await record_event(session, _key_event(key, "api_key.deleted"))
            key_hash = key.key_hash
        if self._key_cache is not None:
            # After the commit, and bumping the cache's generation: a lookup that
            # read the key before the commit cannot cache it again.
            self._key_cache.forget(key_hash)

    async def revoke_api_key(self, key_id: int) -> ApiKey:
        """``kiln keys revoke``: delete a key of any user. A server running in another
        process keeps accepting it for at most ``API_KEY_CACHE_SECONDS`` (its cache)."""
        async with self._db.transaction() as session:
            keys = ApiKeyRepository(session)
            key = await keys.get_any_owner(key_id)
            if key is None:
                raise NotFound(f"api key {key_id} not found")
            await keys.delete(key)
            await record_event(session, replace(_key_event(key, "api_key.deleted"), actor_type="operator"))
        if self._key_cache is not None:
            self._key_cache.forget(key.key_hash)
        return key

    async def bootstrap_admin(self, key_file: Path) -> str | None:
        """On the first start: create ``admin`` and an API key, saved to ``key_file``.

        Returns the new key, or None when ``admin`` already exists (the key was
        shown on the first start and is not recoverable).
        """
        async with self._db.transaction() as session:
            if await UserRepository(session).by_username(ADMIN_USERNAME) is not None:
                return None
        admin = await self.create_user(ADMIN_USERNAME)
        created = await self.create_api_key(admin.id, "admin")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(created.key + "\n")
        # O_CREAT's mode does not apply to a file that already existed.
        os.chmod(key_file, 0o600)
        return created.key


def _key_event(key: ApiKey, event_type: str) -> NewEvent:
    # The prefix tells keys apart; the key itself is never stored, nor its hash shown.
    return NewEvent(
        event_type,
        key.owner_id,
        resource_type="api_key",
        resource_id=str(key.id),
        payload={"name": key.name, "prefix": key.prefix},
        **by_user(key.owner_id),
    )
def _check_key_name(name: str) -> str:
    if not name or len(name) > MAX_KEY_NAME_LENGTH or not name.isprintable():
        raise InvalidRequest.single(
            ("name",), f"must be 1 to {MAX_KEY_NAME_LENGTH} printable characters"
        )
    return name
