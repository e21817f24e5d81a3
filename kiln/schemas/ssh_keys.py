"""Wire models of the account's SSH keys (API.md, "Account"; the instavm SDK's
``add_ssh_key``, ``list_ssh_keys``, ``delete_ssh_key``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody

# An OpenSSH public key line: an RSA key of 16384 bits is about 2.8 KB.
MAX_PUBLIC_KEY_CHARS = 16 * 1024


class SshKeyCreateRequest(RequestBody):
    """POST /v1/ssh-keys: one public key as OpenSSH writes it (``ssh-ed25519 AAAA... comment``)."""

    public_key: str = Field(min_length=1, max_length=MAX_PUBLIC_KEY_CHARS)


class SshKeyRecord(BaseModel):
    id: int
    # OpenSSH's: "SHA256:" and the unpadded base64 of the key blob's SHA-256 (ssh-keygen -lf).
    fingerprint: str
    comment: str
    key_type: str
    # The key without its comment: "<type> <base64>".
    public_key: str
    created_at: datetime


class SshKeyList(BaseModel):
    keys: list[SshKeyRecord]
