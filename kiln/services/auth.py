"""Credentials: password hashing, API keys and bearer tokens.

An API key is ``kiln_`` followed by 43 url-safe characters; only its SHA-256 is
stored. A bearer token is an HS256 JWT signed with a secret kept in the data
dir. Every protected route accepts either kind, in either header, so that the
instavm SDK (which sends its key as ``X-API-Key``) and OAuth2 clients both work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from kiln.services.errors import Unauthenticated
from kiln.store.db import Database
from kiln.store.models import User
from kiln.store.repositories import ApiKeyRepository, UserRepository

API_KEY_PREFIX = "kiln_"
# Characters of a key kept in the clear so listings can tell keys apart.
API_KEY_DISPLAY_CHARS = 12
TOKEN_ALGORITHM = "HS256"
# last_used_at is refreshed at most this often: a write per request would
# serialise every API call on SQLite's single writer.
LAST_USED_RESOLUTION = timedelta(minutes=1)

# scrypt cost: 16 MiB of memory and ~50 ms per hash on a small host.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_SALT_BYTES = 16
# An API key's user is remembered this long, so most requests skip two database
# round trips. A key deleted through this server stops working at once (the
# deletion drops it here); one deleted by another process (the CLI) within this.
API_KEY_CACHE_SECONDS = 5.0
API_KEY_CACHE_MAX_ENTRIES = 1024


def hash_password(password: str) -> str:
    salt = os.urandom(SCRYPT_SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    encode = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p)
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_or_create_secret(path: Path) -> bytes:
    """The token signing secret: made on first start, readable by its owner only."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    # O_EXCL: if another process (the CLI, a second server) won the race, use its secret.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(descriptor, "w") as file:
        file.write(secret.hex())
    return secret


class ApiKeyCache:
    """API key hash -> its user, for ``API_KEY_CACHE_SECONDS``.

    ``forget`` (a key was deleted) also bumps a generation, and a lookup that
    began before it may not store its answer: a request that read the key just
    before its deletion cannot put it back."""

    def __init__(self, ttl_seconds: float = API_KEY_CACHE_SECONDS) -> None:
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, User]] = {}
        self.generation = 0

    def get(self, key_hash: str) -> User | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, user = entry
        if time.monotonic() >= expires:
            del self._entries[key_hash]
            return None
        return user

    def put(self, key_hash: str, user: User, generation: int) -> None:
        if generation != self.generation or self._ttl <= 0:
            return
        if len(self._entries) >= API_KEY_CACHE_MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self._ttl, user)

    def forget(self, key_hash: str) -> None:
        self.generation += 1
        self._entries.pop(key_hash, None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


class AuthService:
    def __init__(
        self,
        db: Database,
        token_secret: bytes,
        token_ttl_seconds: int,
        key_cache: ApiKeyCache | None = None,
    ) -> None:
        self._db = db
        self._token_secret = token_secret
        self._token_ttl = timedelta(seconds=token_ttl_seconds)
        # Shared with UserService, which drops a key from it when deleting the key.
        self.key_cache = key_cache if key_cache is not None else ApiKeyCache()

    async def authenticate(self, credential: str) -> User:
        """The user an API key or a bearer token belongs to; ``Unauthenticated`` if none."""
        if credential.startswith(API_KEY_PREFIX):
            return await self._user_for_api_key(credential)
        return await self._user_for_token(credential)

    async def login(self, username: str, password: str) -> str:
        """A new bearer token for a username and password."""
        async with self._db.transaction() as session:
            user = await UserRepository(session).by_username(username)
        if user is None or user.password_hash is None:
            # Hash anyway so a missing user costs as long as a wrong password.
            verify_password(password, hash_password("timing"))
            raise Unauthenticated("incorrect username or password")
        if not verify_password(password, user.password_hash):
            raise Unauthenticated("incorrect username or password")
        return self.issue_token(user)

    def issue_token(self, user: User) -> str:
        now = datetime.now(UTC)
        claims = {"sub": str(user.id), "iat": now, "exp": now + self._token_ttl}
        return jwt.encode(claims, self._token_secret, algorithm=TOKEN_ALGORITHM)

    async def _user_for_api_key(self, key: str) -> User:
        key_hash = hash_api_key(key)
        cached = self.key_cache.get(key_hash)
        if cached is not None:
            return cached
        generation = self.key_cache.generation
        async with self._db.transaction() as session:
            api_key = await ApiKeyRepository(session).by_hash_any_owner(key_hash)
            if api_key is None:
                raise Unauthenticated("unknown API key")
            now = datetime.now(UTC)
            if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
                api_key.last_used_at = now
            user = await UserRepository(session).by_id(api_key.owner_id)
        if user is None:
            raise Unauthenticated("unknown API key")
        self.key_cache.put(key_hash, user, generation)
        return user

    async def _user_for_token(self, token: str) -> User:
        try:
            claims = jwt.decode(
                token,
                self._token_secret,
                algorithms=[TOKEN_ALGORITHM],
                options={"require": ["sub", "exp"]},
            )
            user_id = int(claims["sub"])
        except (jwt.InvalidTokenError, ValueError) as error:
            raise Unauthenticated(f"invalid token: {error}") from None
        async with self._db.transaction() as session:
            user = await UserRepository(session).by_id(user_id)
        if user is None:
            raise Unauthenticated("invalid token: unknown user")
        return user
