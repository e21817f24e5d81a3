"""Who may log in: the username names a VM (its id, or a session id of its
owner) and the key offered is one its owner registered (``/v1/ssh-keys``).

Looked up in the store (read-only) at every attempt: no cache, so a removed
key opens nothing from the next login on. A missing VM, another user's VM,
an ended VM and an unknown or removed key are all the same answer: no.
"""

from __future__ import annotations

import asyncssh

from kiln.store.db import Database
from kiln.store.ssh_keys import SshKeyRepository, SshLogin

# VMs a login may open: running ones, and those a login may wake (auto_resume).
OPENABLE = ("creating", "running", "suspending", "suspended", "resuming")
MAX_USERNAME_CHARS = 128


class Logins:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def check(self, username: str, key: asyncssh.SSHKey) -> SshLogin | None:
        if not username or len(username) > MAX_USERNAME_CHARS:
            return None
        fingerprint = key.get_fingerprint("sha256")
        async with self.db.transaction() as session:
            login = await SshKeyRepository(session).login_any_owner(username, fingerprint, OPENABLE)
        # A suspended VM's owner is let in: the session then says whether it wakes.
        return login
