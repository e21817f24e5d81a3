"""kiln.crypto: the master key file, AES-GCM sealing, signed share links."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.crypto import links
from kiln.crypto.master_key import InvalidMasterKey, derive_key, load_master_key
from kiln.crypto.sealing import SealError, seal, unseal


def test_the_master_key_is_made_once_0600_and_never_replaced(tmp_path: Path) -> None:
    with pytest.raises(InvalidMasterKey):
        load_master_key(tmp_path, create=False)
    key = load_master_key(tmp_path)
    assert len(key) == 32 and load_master_key(tmp_path) == key
    assert (tmp_path / "master-key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "master-key").write_text("garbled")
    with pytest.raises(InvalidMasterKey, match="backup"):
        load_master_key(tmp_path)
    assert load_master_key(tmp_path, "ab" * 32) == bytes.fromhex("ab" * 32)
    with pytest.raises(InvalidMasterKey, match="KILN_MASTER_KEY"):
        load_master_key(tmp_path, "short")


def test_purpose_keys_differ() -> None:
    master = bytes(32)
    assert derive_key(master, "share-links") != derive_key(master, "dns-credentials")
    assert derive_key(master, "share-links") == derive_key(master, "share-links")


def test_sealed_values_open_only_with_their_key_and_place() -> None:
    key = derive_key(bytes(32), "dns-credentials")
    sealed = seal(key, b"tsig secret", "custom_domains/cd-1")
    assert b"tsig" not in sealed.encode() and unseal(key, sealed, "custom_domains/cd-1") == b"tsig secret"
    for wrong_key, place in ((derive_key(bytes(32), "other"), "custom_domains/cd-1"), (key, "custom_domains/cd-2")):
        with pytest.raises(SealError):
            unseal(wrong_key, sealed, place)
    with pytest.raises(SealError):
        unseal(key, sealed[:-4] + "AAAA", "custom_domains/cd-1")
    with pytest.raises(SealError):
        unseal(key, "v0." + sealed[3:], "custom_domains/cd-1")


def test_links_name_their_share_and_expire() -> None:
    key = derive_key(bytes(32), links.PURPOSE)
    token = links.sign(key, "shr-1", 2000)
    assert links.verify(key, token, "shr-1", now=1000) == 2000
    assert links.verify(key, token, "shr-1", now=2000) is None  # expired
    assert links.verify(key, token, "shr-2", now=1000) is None  # another share
    assert links.verify(derive_key(bytes(31) + b"x", links.PURPOSE), token, "shr-1", now=1000) is None
    assert links.verify(key, token.replace("2000", "9000"), "shr-1", now=1000) is None  # extended by hand
    assert links.verify(key, "garbage", "shr-1", now=1000) is None
