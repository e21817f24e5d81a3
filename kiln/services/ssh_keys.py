"""SSH keys of an account: the public keys its owner logs in to VMs with.

A key is parsed with asyncssh (the library the gateway authenticates with), so
what is accepted here is exactly what the gateway can check. Refused with a
422 naming the reason: text that is no OpenSSH public key (a private key
pasted by mistake among them), several keys at once, DSA keys and RSA keys
under 2048 bits. A key its owner already registered is a 409; another user's
key of the same name is a 404.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh
from sqlalchemy.exc import IntegrityError

from kiln.services.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from kiln.store.db import Database
from kiln.store.models import SshKey
from kiln.store.ssh_keys import SshKeyRepository

MAX_KEYS_PER_USER = 100
MIN_RSA_BITS = 2048
MAX_COMMENT_CHARS = 255
ALLOWED_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
LOC = ("public_key",)


@dataclass(frozen=True)
class ParsedKey:
    key_type: str
    public_key: str  # "<type> <base64>"
    fingerprint: str
    comment: str


def fingerprint_of(key: asyncssh.SSHKey) -> str:
    """OpenSSH's SHA256 fingerprint (what ``ssh-keygen -lf`` and the SDK print)."""
    return key.get_fingerprint("sha256")


def parse_public_key(text: str) -> ParsedKey:
    """One OpenSSH public key line, checked; InvalidRequest (422) saying why not."""
    text = text.strip()
    if "PRIVATE KEY" in text:
        raise InvalidRequest.single(LOC, "this is a private key: send the public one (the .pub file)")
    if "\n" in text or "\r" in text:
        raise InvalidRequest.single(LOC, "send one public key (one line)")
    try:
        key = asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as error:
        raise InvalidRequest.single(LOC, f"not an OpenSSH public key ({error})") from None
    key_type = key.get_algorithm()
    if key_type not in ALLOWED_TYPES:
        raise InvalidRequest.single(LOC, f"keys of type {key_type} are not accepted (use ssh-ed25519)")
    if key_type == "ssh-rsa" and _rsa_bits(key) < MIN_RSA_BITS:
        raise InvalidRequest.single(LOC, f"RSA keys need at least {MIN_RSA_BITS} bits")
    blob = key.export_public_key("openssh").decode("ascii").split()
    comment = (key.get_comment() or "").strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidRequest.single(LOC, f"the comment is longer than {MAX_COMMENT_CHARS} characters")
    return ParsedKey(key_type, f"{blob[0]} {blob[1]}", fingerprint_of(key), comment)


def _rsa_bits(key: asyncssh.SSHKey) -> int:
    public = getattr(key, "pyca_key", None)
    size = getattr(public, "key_size", None)
    return int(size) if size is not None else 0


class SshKeyService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, owner_id: int, text: str) -> SshKey:
        parsed = parse_public_key(text)
        try:
            async with self.db.transaction() as session:
                keys = SshKeyRepository(session)
                if await keys.by_fingerprint(owner_id, parsed.fingerprint) is not None:
                    raise Conflict(f"this key ({parsed.fingerprint}) is registered already")
                if len(await keys.list(owner_id)) >= MAX_KEYS_PER_USER:
                    raise QuotaExceeded(f"ssh key quota: at most {MAX_KEYS_PER_USER} keys per user")
                return await keys.add(
                    SshKey(
                        owner_id=owner_id,
                        fingerprint=parsed.fingerprint,
                        key_type=parsed.key_type,
                        public_key=parsed.public_key,
                        comment=parsed.comment,
                    )
                )
        except IntegrityError:
            # The same key added twice at once: the unique index let one in.
            raise Conflict(f"this key ({parsed.fingerprint}) is registered already") from None

    async def list(self, owner_id: int) -> list[SshKey]:
        async with self.db.transaction() as session:
            return await SshKeyRepository(session).list(owner_id)

    async def delete(self, owner_id: int, key_id: int) -> None:
        """From now on the key opens nothing (the gateway looks keys up at every login)."""
        async with self.db.transaction() as session:
            if not await SshKeyRepository(session).delete(owner_id, key_id):
                raise NotFound(f"ssh key {key_id} not found")
