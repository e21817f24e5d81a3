"""The master key: encrypts secrets at rest (``sealing``) and keys Kiln's signatures.

From ``KILN_MASTER_KEY`` (64 hex digits) when set, else ``$KILN_DATA_DIR/master-key``
(0600, 32 random bytes as hex), made at the first start. A key that is there but
unusable is refused (``InvalidMasterKey``), never replaced: what it sealed would
be lost. Purpose keys are derived with HKDF, so no two uses share a key.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kiln.crypto.files import create_exclusively

MASTER_KEY_BYTES = 32
MASTER_KEY_FILE = "master-key"


class InvalidMasterKey(Exception):
    """The master key setting or file is unusable; ``str()`` says what to do."""


def _parse(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise InvalidMasterKey(
            f"the master key in {where} must be {MASTER_KEY_BYTES} bytes as {2 * MASTER_KEY_BYTES} hex digits; "
            "restore it from a backup (secrets sealed with it cannot be read without it)"
        )
    return key


def load_master_key(data_dir: Path, setting: str = "", *, create: bool = True) -> bytes:
    """The master key (``setting`` is ``KILN_MASTER_KEY``); made in the data dir if
    neither exists and ``create`` (processes that only read, like the router, pass False)."""
    if setting:
        return _parse(setting, "KILN_MASTER_KEY")
    path = data_dir / MASTER_KEY_FILE
    try:
        return _parse(path.read_text(errors="replace"), str(path))
    except FileNotFoundError:
        if not create:
            raise InvalidMasterKey(f"no master key: {path} does not exist and KILN_MASTER_KEY is not set") from None
    return _parse(create_exclusively(path, secrets.token_bytes(MASTER_KEY_BYTES).hex()), str(path))


def derive_key(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (``"share-links"``, ``"dns-credentials"``...)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"kiln/{purpose}".encode()).derive(master)
