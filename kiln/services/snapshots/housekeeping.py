"""Snapshot housekeeping: collecting saved states nothing needs, flattening
long disk chains."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kiln.config import Settings
from kiln.node.node import Node
from kiln.runtime.snapshots import directory_size, remove_saved
from kiln.services.background import BackgroundTasks, Periodic
from kiln.services.snapshots.rows import IMPORTED_ROOTFS_NAME, dependents, record, reload
from kiln.services.states import COLLECTABLE_TYPES, SnapshotStatus
from kiln.store.db import Database
from kiln.store.repositories import SnapshotRepository

log = logging.getLogger(__name__)

GC_INTERVAL_SECONDS = 60.0


class Housekeeping:
    def __init__(self, settings: Settings, db: Database, node: Node, background: BackgroundTasks) -> None:
        self._settings = settings
        self._db = db
        self._node = node
        self._background = background
        self._passes = Periodic("snapshot-gc", self.collect_garbage, GC_INTERVAL_SECONDS, wait_first=True)

    async def start(self) -> None:
        await self.collect_garbage()
        self._passes.start()

    async def stop(self) -> None:
        await self._passes.stop()

    async def collect_garbage(self) -> None:
        """Remove what nothing needs any more: suspended states and disk layers
        no VM or snapshot stands on (a suspended VM stands on its own), and
        directories under the snapshots dir that no row names (a crash between
        the two)."""
        while await self._remove_one_unneeded():
            pass
        snapshots_dir = self._settings.snapshots_dir
        if not snapshots_dir.is_dir():
            return
        async with self._db.transaction() as session:
            known = {Path(s.directory).name for s in await SnapshotRepository(session).list_any_owner()}
        for directory in snapshots_dir.iterdir():
            if directory.name not in known:
                log.info("removing %s: no snapshot record names it", directory)
                await asyncio.to_thread(remove_saved, directory)

    async def _remove_one_unneeded(self) -> bool:
        async with self._db.transaction() as session:
            snapshots = SnapshotRepository(session)
            for snapshot in await snapshots.list_any_owner(COLLECTABLE_TYPES):
                # A save in progress has no dependents yet, and must not lose its directory.
                if snapshot.status == SnapshotStatus.CREATING:
                    continue
                vms, children = await dependents(snapshots, snapshot.id)
                if vms or children:
                    continue
                await snapshots.delete(snapshot)
                directory = Path(snapshot.directory)
                break
            else:
                return False
        await asyncio.to_thread(remove_saved, directory)
        return True

    async def flatten_if_deep(self, snapshot_id: str) -> None:
        """Past ``KILN_MAX_DISK_CHAIN`` layers, flatten the snapshot's disk in the background."""
        if await self._chain_depth(snapshot_id) > self._settings.max_disk_chain:
            self._background.run(self._flatten(snapshot_id), f"flatten {snapshot_id}")

    async def _chain_depth(self, snapshot_id: str) -> int:
        """Snapshot disks under (and including) this one's, down to the image."""
        depth: int = 0
        current: str | None = snapshot_id
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            while current is not None and depth <= self._settings.max_disk_chain + 1:
                snapshot = await repository.get_any_owner(current)
                if snapshot is None:
                    break
                depth, current = depth + 1, snapshot.parent_id
        return depth

    async def _flatten(self, snapshot_id: str) -> None:
        """Make the snapshot's disk stand on the image alone, so that reads do not
        walk a long chain and its parents become deletable."""
        snapshot = await reload(self._db, snapshot_id)
        try:
            await self._node.flatten_saved_disk(Path(snapshot.directory))
        except Exception as error:
            log.warning("flattening snapshot %s failed: %s", snapshot_id, error)
            return
        size = await asyncio.to_thread(directory_size, Path(snapshot.directory))
        # An imported image's rootfs lives in its snapshot: the flat disk still
        # stands on it, so that snapshot stays its parent.
        await record(self._db, snapshot_id, None, parent_id=await self._imported_root(snapshot_id), size_bytes=size)

    async def _imported_root(self, snapshot_id: str) -> str | None:
        """The bottom of the snapshot's disk chain if that is an imported image."""
        bottom = None
        current: str | None = snapshot_id
        async with self._db.transaction() as session:
            repository = SnapshotRepository(session)
            for _ in range(self._settings.max_disk_chain + 2):
                if current is None:
                    break
                row = await repository.get_any_owner(current)
                if row is None:
                    break
                bottom, current = row, row.parent_id
        if bottom is None or bottom.id == snapshot_id:
            return None
        return bottom.id if (Path(bottom.directory) / IMPORTED_ROOTFS_NAME).exists() else None
