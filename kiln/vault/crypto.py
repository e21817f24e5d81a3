"""The master key, and secrets sealed under it with AES-GCM.

Anything Kiln keeps secret at rest (vault credentials; DNS provider credentials
of custom domains) is stored as ``MasterKey.seal(value, context)``: a text token
``v1.<key id>.<base64url(nonce | ciphertext | tag)>``. ``context`` is bound
into the tag as associated data (e.g. ``vault-credential:<id>``), so a token
copied onto another row, or into another purpose, does not open. The key id
names the master key that sealed it: a token sealed under another key fails
with that said, rather than as a corrupt value.

Where the key comes from (``load_master_key``):

1. ``KILN_MASTER_KEY`` in the environment: 32 bytes as base64 (standard or
   URL-safe, padding optional) or as 64 hex digits (``openssl rand -base64 32``);
2. else ``$KILN_DATA_DIR/master.key``, made on the first start (0600, written
   whole and linked into place: two processes starting at once agree on one key).

The variable is read from the environment here, not through ``Settings``, on
purpose: settings are dumped to files (the egress daemon's config) and
printed, and the master key must never be in either.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_VARIABLE = "KILN_MASTER_KEY"
KEY_FILE = "master.key"
KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = "v1"


class MasterKeyError(RuntimeError):
    """No usable master key (a malformed variable, an unreadable or too open key file)."""


class SealedValueError(ValueError):
    """A sealed token that does not open: another key, another context, or changed."""


class MasterKey:
    """An AES-256-GCM key. Its bytes never appear in ``repr`` or ``str``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise MasterKeyError(f"a master key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"kiln master key id\0" + key).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"MasterKey(id={self.key_id})"

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{VERSION}.{self.key_id}.{body}"

    def open(self, token: str, context: str) -> bytes:
        version, key_id, body = _split(token)
        if version != VERSION:
            raise SealedValueError(f"sealed with an unknown format {version!r}")
        if key_id != self.key_id:
            raise SealedValueError(f"sealed under another master key ({key_id}, this one is {self.key_id})")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SealedValueError("the sealed value does not open (changed, or sealed for another use)") from None


def _split(token: str) -> tuple[str, str, str]:
    parts = token.split(".")
    if len(parts) != 3:
        raise SealedValueError("not a sealed value")
    return parts[0], parts[1], parts[2]


def parse_key(text: str) -> bytes:
    """32 key bytes from base64 or hex text; MasterKeyError (never quoting the text) otherwise."""
    text = text.strip()
    if len(text) == 2 * KEY_BYTES:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(text)
    padded = text + "=" * (-len(text) % 4)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            key = decode(padded.encode())
        except (binascii.Error, ValueError):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise MasterKeyError(
        f"{MASTER_KEY_VARIABLE} must be {KEY_BYTES} bytes as base64 or 64 hex digits "
        "(e.g. the output of `openssl rand -base64 32`)"
    )


def load_master_key(data_dir: Path, environ: Mapping[str, str] | None = None) -> MasterKey:
    """The installation's master key (see the module docstring), made on first use."""
    environ = os.environ if environ is None else environ
    configured = environ.get(MASTER_KEY_VARIABLE, "")
    if configured.strip():
        return MasterKey(parse_key(configured))
    return MasterKey(_key_file(data_dir / KEY_FILE))


def _key_file(path: Path) -> bytes:
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    # Written whole under a temporary name, then linked into place: the key
    # file never exists half-written, and link() fails if another process
    # made one first (that one is then the key).
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".master-key-")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(base64.b64encode(key).decode() + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _read_key_file(path)
    finally:
        os.unlink(temporary)
    return key


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); make it 0600")
    text = path.read_text().strip()
    try:
        return parse_key(text)
    except MasterKeyError:
        raise MasterKeyError(f"{path} does not hold a {KEY_BYTES}-byte key as base64 or hex") from None
