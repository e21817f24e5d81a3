"""Signed, expiring share links: a token that admits its bearer to one share until a time.

A token is ``<share_id>.<expires, unix seconds>.<base64url HMAC-SHA256>`` keyed
with the master key's ``share-links`` purpose key. It names its share, so a
token of one share opens no other; revoking or deleting the share ends it too
(the router checks the share first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

PURPOSE = "share-links"


def _mac(key: bytes, share_id: str, expires: int) -> str:
    digest = hmac.new(key, f"{share_id}.{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(key: bytes, share_id: str, expires: int) -> str:
    return f"{share_id}.{expires}.{_mac(key, share_id, expires)}"


def verify(key: bytes, token: str, share_id: str, now: float | None = None) -> int | None:
    """The token's expiry if it is a live token of ``share_id``, else None."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != share_id or not parts[1].isdigit():
        return None
    expires = int(parts[1])
    if not hmac.compare_digest(parts[2], _mac(key, share_id, expires)):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return expires
