"""Who may use a private share, and Kiln's credentials taken off a request.

A private share admits its owner's API key or bearer token (``X-API-Key`` or
``Authorization: Bearer``), or a signed link (``kiln_share_token`` in the
query, then the HttpOnly cookie ``kiln_share`` the router sets for that host).
Another user's credential gets the 404 a share that does not exist gets.
Whatever Kiln read (its headers, its cookie, the link parameter) never reaches
the guest; credentials that are not Kiln's (an app's own ``Authorization``)
pass through untouched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

from kiln.crypto import links
from kiln.crypto.credentials import API_KEY_PREFIX, hash_api_key, read_token_secret, token_user_id
from kiln.store.db import Database
from kiln.store.repositories import ApiKeyRepository

COOKIE = "kiln_share"
LINK_PARAMETER = "kiln_share_token"
# An API key's owner is remembered this long (the API's own cache lifetime):
# a revoked key stops opening private shares within it.
KEY_CACHE_SECONDS = 5.0
KEY_CACHE_MAX_ENTRIES = 1024


class Verdict(Enum):
    ADMIT = "admit"
    SIGN_IN = "sign-in"  # no usable credential: 401
    NOT_YOURS = "not-yours"  # another user's credential: 404


@dataclass(frozen=True)
class Credentials:
    """Kiln's credentials found on one request."""

    api_key: str | None
    bearer: str | None
    cookie_token: str | None
    link_token: str | None


def credentials_of(headers: Mapping[str, str], query: Mapping[str, str]) -> Credentials:
    api_key = headers.get("X-API-Key") or None
    bearer = None
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        bearer = value.strip()
    cookie_token = None
    raw_cookie = headers.get("Cookie")
    if raw_cookie:
        try:
            jar = SimpleCookie(raw_cookie)
        except CookieError:
            jar = SimpleCookie()
        if COOKIE in jar:
            cookie_token = jar[COOKIE].value
    return Credentials(api_key, bearer, cookie_token, query.get(LINK_PARAMETER))


def strip_cookie(raw_cookie: str) -> str:
    """The Cookie header without Kiln's cookie (the others byte for byte)."""
    kept = [part for part in raw_cookie.split(";") if part.strip().partition("=")[0].strip() != COOKIE]
    return ";".join(kept).strip()


class Gatekeeper:
    def __init__(self, db: Database, data_dir: Path, link_key: bytes) -> None:
        self._db = db
        self._token_secret_file = data_dir / "token-secret"
        self._link_key = link_key
        self._keys: dict[str, tuple[float, int | None]] = {}

    def link_expiry(self, token: str | None, share_id: str) -> int | None:
        return links.verify(self._link_key, token, share_id) if token else None

    async def verdict(self, credentials: Credentials, share_id: str, owner_id: int) -> Verdict:
        if self.link_expiry(credentials.link_token, share_id) or self.link_expiry(credentials.cookie_token, share_id):
            return Verdict.ADMIT
        users = [await self._owner_of_key(credentials.api_key)] if credentials.api_key else []
        if credentials.bearer:
            users.append(await self.user_of(credentials.bearer))
        known = [user for user in users if user is not None]
        if owner_id in known:
            return Verdict.ADMIT
        return Verdict.NOT_YOURS if known else Verdict.SIGN_IN

    def is_kiln_token(self, value: str) -> bool:
        secret = read_token_secret(self._token_secret_file)
        return secret is not None and token_user_id(secret, value) is not None

    async def user_of(self, credential: str) -> int | None:
        """The user of a Kiln API key or bearer token (None: not one of Kiln's)."""
        if credential.startswith(API_KEY_PREFIX):
            return await self._owner_of_key(credential)
        secret = read_token_secret(self._token_secret_file)
        return token_user_id(secret, credential) if secret else None

    async def _owner_of_key(self, key: str | None) -> int | None:
        if not key or not key.startswith(API_KEY_PREFIX):
            return None
        digest = hash_api_key(key)
        now = time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._db.transaction() as session:
            row = await ApiKeyRepository(session).by_hash_any_owner(digest)
        owner = row.owner_id if row is not None else None
        if len(self._keys) >= KEY_CACHE_MAX_ENTRIES:
            self._keys.clear()
        self._keys[digest] = (now + KEY_CACHE_SECONDS, owner)
        return owner
