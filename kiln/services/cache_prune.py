"""The server's automatic ``kiln images prune``: every
``KILN_IMAGE_PRUNE_INTERVAL_SECONDS`` (0: never), the same plan and removal
(``kiln.runtime.prune``) over this server's data dir.

- **Same rules as the command.** *What:* a build or base snapshot goes only
  when no live process, no disk chain and no state file of this data dir
  names it, and it is not (of) the current build of its variant. *Why:* the
  running VMs, the warm pool and saved or suspended VMs all show up there;
  nothing the server knows only in memory needs an old build (new VMs take
  the current one).
- **Never against a build.** A pass while an image build holds the cache is
  skipped (tried again at the next interval) rather than waited for: the
  server's thread must not block for a build's minutes.
- **Rows follow files.** A base snapshot's row (made on first use, shown to
  every user) whose directory is gone, by this pass or by the command, is
  removed at the pass, so no one is offered a snapshot that cannot restore.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kiln.config import Settings
from kiln.runtime.prune import BuildInProgress, prune_cache
from kiln.services.background import Periodic
from kiln.services.states import SnapshotType
from kiln.store.db import Database
from kiln.store.repositories import SnapshotRepository

log = logging.getLogger(__name__)


class CachePrune:
    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings = settings
        self._db = db
        # A wait first: the server's start (adoption, recovery) settles before a pass.
        self._passes = Periodic("cache-prune", self.prune, settings.image_prune_interval_seconds, wait_first=True)

    async def prune(self) -> list[Path]:
        """One pass: the directories removed (none while a build runs)."""
        try:
            plan, freed = await asyncio.to_thread(
                prune_cache, self._settings, [self._settings.data_dir], dry_run=False, wait=False
            )
        except BuildInProgress:
            log.info("an image build is running: the cache is pruned at the next pass")
            return []
        if plan.remove:
            names = ", ".join(path.name for path in plan.remove)
            log.info("pruned the image cache: %s (%d MiB)", names, freed >> 20)
        await self._forget_missing_bases()
        return plan.remove

    async def _forget_missing_bases(self) -> None:
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            for snapshot in await repository.list_any_owner([SnapshotType.BASE]):
                if not await asyncio.to_thread(Path(snapshot.directory).is_dir):
                    await repository.delete(snapshot)

    def start(self) -> None:
        if self._settings.image_prune_interval_seconds > 0:
            self._passes.start()

    async def stop(self) -> None:
        await self._passes.stop()
