"""One operation at a time on a volume's files.

Every change to a volume (its chain, ``volume.json``, its attachments) and
every host-side look at its filesystem holds that volume's lock: an asyncio
lock within this process, and an ``flock`` on ``<volume>/lock`` against other
processes on the host. Different volumes never wait for each other. Nothing
holds two volumes' locks, so there is no lock order to keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from kiln.volumes.errors import VolumeBusy

LOCK_POLL_SECONDS = 0.02
LOCK_WAIT_SECONDS = 120.0


class VolumeLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(
        self, lock_file: Path, timeout: float = LOCK_WAIT_SECONDS
    ) -> AsyncIterator[None]:
        key = str(lock_file)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout)
        except TimeoutError:
            raise VolumeBusy(
                f"{lock_file.parent.name} is busy with another operation"
            ) from None
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise VolumeBusy(
                                f"{lock_file.parent.name} is locked by another process"
                            ) from None
                        await asyncio.sleep(LOCK_POLL_SECONDS)
                yield
            finally:
                os.close(fd)  # releases the flock
        finally:
            lock.release()
