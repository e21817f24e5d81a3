"""Who the SSH gateway lets in (``kiln.sshd.logins`` over a real SQLite store,
read-only as the gateway opens it): the username names a VM by id or session
id, and the key offered must be one of that VM's owner's."""

from __future__ import annotations

from pathlib import Path

import asyncssh
from unit.test_store import add_vm

from kiln.sshd import hostkey
from kiln.sshd.logins import Logins
from kiln.store.db import Database
from kiln.store.models import SshKey
from kiln.store.repositories import UserRepository
from kiln.store.ssh_keys import SshKeyRepository


async def register(db: Database, owner_id: int, key: asyncssh.SSHKey) -> int:
    async with db.transaction() as session:
        row = await SshKeyRepository(session).add(
            SshKey(owner_id=owner_id, fingerprint=key.get_fingerprint("sha256"), key_type="ssh-ed25519",
                   public_key="ssh-ed25519 AAAA", comment="")
        )  # fmt: skip
        return row.id


async def test_a_login_needs_the_vms_owners_key(db: Database, settings) -> None:  # type: ignore[no-untyped-def]
    async with db.transaction() as session:
        alice = await UserRepository(session).add("alice", None)
        bob = await UserRepository(session).add("bob", None)
    await add_vm(db, alice.id, "vm-a")
    await add_vm(db, bob.id, "vm-b")
    await add_vm(db, alice.id, "vm-gone", status="terminated")
    alices, bobs, nobodys = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(3))
    alice_key_id = await register(db, alice.id, alices)
    await register(db, bob.id, bobs)

    reader = Database(settings.database, read_only=True)
    try:
        logins = Logins(reader)
        login = await logins.check("vm-a", alices)
        assert login is not None and (login.vm_id, login.owner_id, login.key_id) == ("vm-a", alice.id, alice_key_id)
        by_session = await logins.check("s-vm-a", alices)
        assert by_session is not None and by_session.vm_id == "vm-a"
        # Another user's key, an unknown key, a VM that ended, a VM that does not exist: no.
        assert await logins.check("vm-a", bobs) is None
        assert await logins.check("vm-b", alices) is None
        assert await logins.check("vm-a", nobodys) is None
        assert await logins.check("vm-gone", alices) is None
        assert await logins.check("vm-none", alices) is None
        assert await logins.check("x" * 1000, alices) is None
        # A removed key opens nothing from the next attempt on.
        async with db.transaction() as session:
            assert await SshKeyRepository(session).delete(alice.id, alice_key_id)
        assert await logins.check("vm-a", alices) is None
    finally:
        await reader.close()


def test_the_host_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "ssh_host_ed25519_key"
    first = hostkey.load_or_create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    again = hostkey.load_or_create(path)
    assert again.get_fingerprint("sha256") == first.get_fingerprint("sha256")
    path.chmod(0o644)
    hostkey.load_or_create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]
