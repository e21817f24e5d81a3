"""The gateway's host key: made on its first start, kept (0600) for every start after.

Clients remember it (``known_hosts``); a new key at every start would make
every client refuse the gateway as an impostor after a restart.
"""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh


def load_or_create(path: Path) -> asyncssh.SSHKey:
    """The Ed25519 key at ``path``; made there (0600, written whole) if it is missing."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment="kiln ssh gateway")
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key.export_private_key("openssh"))
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(temporary, path)  # a key another start made meanwhile wins
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return asyncssh.read_private_key(str(path))
