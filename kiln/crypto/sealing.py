"""AES-256-GCM for secrets at rest: ``seal`` and ``unseal`` with a purpose key.

A sealed value is ``v1.<base64url(nonce || ciphertext+tag)>``. The associated
data binds it to where it is stored (a row's id and column), so a sealed value
copied into another row does not open there.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "v1"
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed value that does not open (wrong key, wrong place or tampered with)."""


def seal(key: bytes, plaintext: bytes, associated: str) -> str:
    nonce = os.urandom(NONCE_BYTES)
    body = AESGCM(key).encrypt(nonce, plaintext, associated.encode())
    return f"{VERSION}.{base64.urlsafe_b64encode(nonce + body).decode()}"


def unseal(key: bytes, sealed: str, associated: str) -> bytes:
    version, _, encoded = sealed.partition(".")
    if version != VERSION:
        raise SealError(f"unknown sealed value version {version!r}")
    try:
        raw = base64.urlsafe_b64decode(encoded)
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated.encode())
    except (InvalidTag, ValueError) as error:
        raise SealError("the sealed value does not open with this key here") from error
