"""Kiln's own credentials as other processes than the API check them (the share router).

API keys are ``kiln_`` + 43 url-safe characters, found by their SHA-256; bearer
tokens are HS256 JWTs signed with ``$KILN_DATA_DIR/token-secret``. The API's
``kiln.services.auth`` issues both and uses these same definitions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jwt

API_KEY_PREFIX = "kiln_"
TOKEN_ALGORITHM = "HS256"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token_user_id(secret: bytes, token: str) -> int | None:
    """The user id of a valid, unexpired bearer token, else None."""
    try:
        claims = jwt.decode(token, secret, algorithms=[TOKEN_ALGORITHM], options={"require": ["sub", "exp"]})
        return int(claims["sub"])
    except (jwt.InvalidTokenError, ValueError):
        return None


def read_token_secret(path: Path) -> bytes | None:
    """The token secret of the data dir, or None when there is none (yet) or it is unusable."""
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return secret or None
