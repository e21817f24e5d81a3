"""Credentials: password hashing, API keys and bearer tokens.

An API key is ``kiln_`` followed by 43 url-safe characters; only its SHA-256 is
stored. A bearer token is an HS256 JWT signed with a secret kept in the data
dir. Every protected route accepts either kind, in either header, so that the
instavm SDK (which sends its key as ``X-API-Key``) and OAuth2 clients both work.

Against a caller who guesses: scrypt runs in a worker thread (a login never
stalls the event loop), a login for a user that does not exist verifies the
password against a dummy hash (it costs one scrypt, like a wrong password),
password digests are compared with ``hmac.compare_digest`` and JWT signatures
by PyJWT (which does the same). API keys are found by the SHA-256 of the key:
timing can at most tell something about a hash, never about a key. The token
secret must be at least ``MIN_TOKEN_SECRET_BYTES`` long: an empty, short or
garbled secret file is refused at start (``InvalidTokenSecret``), never used.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from kiln.crypto.credentials import API_KEY_PREFIX, TOKEN_ALGORITHM, hash_api_key
from kiln.crypto.files import create_exclusively
from kiln.services.errors import Unauthenticated
from kiln.services.events.record import NewEvent, record_alone
from kiln.store.db import Database
from kiln.store.models import User
from kiln.store.repositories import ApiKeyRepository, UserRepository

# Characters of a key kept in the clear so listings can tell keys apart.
API_KEY_DISPLAY_CHARS = 12
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
# HS256 wants a key at least as long as its hash (RFC 7518, 3.2).
MIN_TOKEN_SECRET_BYTES = 32


class InvalidTokenSecret(Exception):
    """The token secret file is unusable; ``str()`` tells the operator what to do."""


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


@functools.cache
def dummy_password_hash() -> str:
    """What a login for an unknown user is verified against: made once, so
    that such a login costs one scrypt, like a login with a wrong password."""
    return hash_password(secrets.token_urlsafe(16))


async def hash_password_off_loop(password: str) -> str:
    return await asyncio.to_thread(hash_password, password)


async def verify_password_off_loop(password: str, stored: str) -> bool:
    # verify_password is looked up at call time, so tests can count its calls.
    return await asyncio.to_thread(verify_password, password, stored)


def parse_secret(text: str, path: Path) -> bytes:
    """The secret in a token-secret file's text; InvalidTokenSecret if it is unusable."""
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < MIN_TOKEN_SECRET_BYTES:
        raise InvalidTokenSecret(
            f"the token secret in {path} is empty, too short or not hex (it needs "
            f"{MIN_TOKEN_SECRET_BYTES} random bytes as {2 * MIN_TOKEN_SECRET_BYTES} hex digits); "
            f"remove the file to have a new one made at the next start (bearer tokens "
            f"signed with the old one stop working), or restore it from a backup"
        )
    return secret


def load_or_create_secret(path: Path) -> bytes:
    """The token signing secret: made on first start, readable by its owner only.
    An existing file that holds no usable secret is refused (InvalidTokenSecret)."""
    try:
        return parse_secret(path.read_text(errors="replace"), path)
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(MIN_TOKEN_SECRET_BYTES)
    # Another process (the CLI, a second server) may have won the race: its secret is the one used.
    return parse_secret(create_exclusively(path, secret.hex()), path)


class ApiKeyCache:
    """API key hash -> its user, for ``API_KEY_CACHE_SECONDS``.

    ``forget`` (a key was deleted) also bumps a generation, and a lookup that
    began before it may not store its answer: a request that read the key just
    before its deletion cannot put it back."""

    def __init__(
        self,
        ttl_seconds: float = API_KEY_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, User]] = {}
        self.generation = 0

    def get(self, key_hash: str) -> User | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, user = entry
        if self._clock() >= expires:
            del self._entries[key_hash]
            return None
        return user

    def put(self, key_hash: str, user: User, generation: int) -> None:
        if generation != self.generation or self._ttl <= 0:
            return
        if len(self._entries) >= API_KEY_CACHE_MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = (self._clock() + self._ttl, user)

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
        if len(token_secret) < MIN_TOKEN_SECRET_BYTES:
            raise InvalidTokenSecret(
                f"a token secret must be at least {MIN_TOKEN_SECRET_BYTES} bytes long"
            )
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
        # A user without a password (or none at all) is verified against the
        # dummy hash: the answer takes as long as for a wrong password.
        known = user is not None and user.password_hash is not None
        if user is not None and user.password_hash is not None:
            stored = user.password_hash
        else:
            stored = await asyncio.to_thread(dummy_password_hash)  # made once, in a thread
        if not await verify_password_off_loop(password, stored) or not known:
            # Only password logins are recorded: each costs one scrypt, so they cannot
            # flood the log the way a stream of made-up API keys could.
            failed = NewEvent(
                "auth.login_failed",
                user.id if user is not None else None,
                status="denied",
                resource_type="user",
                resource_id=username[:128],
                payload={"username": username[:128]},
                actor_type="anonymous",
            )
            await record_alone(self._db, failed)
            raise Unauthenticated("incorrect username or password")
        assert user is not None
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
