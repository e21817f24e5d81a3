"""Secret files in the data dir: made once, whole, readable by their owner only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_exclusively(path: Path, text: str) -> str:
    """Write ``text`` to ``path`` (0600) unless it exists; returns the file's text.

    Written whole under a temporary name, then linked into place: a reader never
    sees half a file, and if another process (the CLI, a second server, the
    router) won the race, ``link`` fails and the winner's text is returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            return path.read_text(errors="replace")
    finally:
        partial.unlink(missing_ok=True)
    return text
