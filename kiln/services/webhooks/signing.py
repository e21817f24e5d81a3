"""The signature the instavm SDK's ``webhooks.verify`` checks.

``InstaVM-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` over
``"<t>." + body``, keyed with the endpoint's whole secret string (``whsec_...``)
as UTF-8. The body is the exact bytes sent: the receiver must verify those,
not a re-serialised copy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

SIGNATURE_HEADER = "InstaVM-Signature"
SECRET_PREFIX = "whsec_"
HINT_CHARS = 4


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hint(secret: str) -> str:
    """What a listing shows of a secret: enough to tell two apart, nothing to sign with."""
    return SECRET_PREFIX + "…" + secret[-HINT_CHARS:]


def body_bytes(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"
