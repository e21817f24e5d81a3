"""Volumes and their checkpoints: the user's records, the disk quota, and the
host's files kept in step with them (``kiln.volumes`` through the node).

A volume is a row (owner, name, quota) and a directory of the mechanism's,
named by the same id. Creating makes the files first and the row after;
deleting removes the files inside the transaction that deletes the row (under
the row's lock, with no mount left); so a crash leaves at most files without a
row, which ``start`` removes. Checkpoints the same way: the host's checkpoint
first, the row after; ``start`` removes host checkpoints that no row and no
snapshot accounts for (a snapshot keeps the content of the drives it was saved
with as a checkpoint named by its id: ``kiln.services.volumes.captures``).

The disk quota (``KILN_QUOTA_DISK_MB``; unset: the data disk's size) counts
what each volume may grow to (``quota_bytes``) and what each snapshot takes
(``size_bytes``); creating or growing a volume past it is a 429 naming it.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
import shutil
from collections import defaultdict

from kiln.config import Settings
from kiln.node.node import Node
from kiln.node.volumes import NodeVolumes
from kiln.schemas.volumes import CheckpointCreateRequest, VolumeCreateRequest, VolumeUpdateRequest
from kiln.services.errors import Conflict, FieldProblem, InvalidRequest, NotFound, QuotaExceeded, Unsupported
from kiln.services.states import SnapshotStatus
from kiln.services.volumes.errors import volume_errors
from kiln.services.volumes.mounts import HOLDING_STATES
from kiln.store.db import Database
from kiln.store.models import Volume, VolumeCheckpoint
from kiln.store.repositories import SnapshotRepository
from kiln.store.volume_repositories import CheckpointRepository, MountRepository, VolumeRepository
from kiln.volumes import VolumeError, VolumeNotFound

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_NAME_LENGTH = 255


def new_volume_id() -> str:
    return "vol-" + secrets.token_hex(8)


def new_checkpoint_id() -> str:
    return "cp-" + secrets.token_hex(8)


def _check_name(problems: list[FieldProblem], name: str | None, required: bool) -> None:
    if name is None:
        if required:
            problems.append(FieldProblem(("name",), "is required"))
        return
    if not 1 <= len(name) <= MAX_NAME_LENGTH or not name.isprintable():
        problems.append(FieldProblem(("name",), f"must be 1-{MAX_NAME_LENGTH} printable characters"))


class VolumeService:
    def __init__(self, settings: Settings, db: Database, node: Node) -> None:
        self._settings = settings
        self._db = db
        self._node = node
        # One quota check and the insert it allows at a time, per owner.
        self._quota_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def host(self) -> NodeVolumes:
        if self._node.volumes is None:
            raise Unsupported("volumes are not available on this server")
        return self._node.volumes

    # -- volumes -----------------------------------------------------------------------

    async def create(self, owner_id: int, request: VolumeCreateRequest) -> Volume:
        problems: list[FieldProblem] = []
        _check_name(problems, request.name, required=True)
        self._check_size(problems, request.quota_bytes)
        if problems:
            raise InvalidRequest(problems)
        volume_id = new_volume_id()
        async with self._quota_locks[owner_id]:
            await self._check_quota(owner_id, request.quota_bytes)
            with volume_errors("quota_bytes"):
                info = await self.host.volumes.create(volume_id, request.quota_bytes)
            try:
                async with self._db.transaction() as session:
                    return await VolumeRepository(session).add(
                        Volume(
                            id=volume_id,
                            owner_id=owner_id,
                            name=request.name,
                            quota_bytes=request.quota_bytes,
                            used_bytes=info.used_bytes,
                        )
                    )
            except BaseException:
                with volume_errors():
                    await self.host.volumes.delete(volume_id)
                raise

    async def list(self, owner_id: int, refresh_usage: bool = False) -> list[tuple[Volume, bool]]:
        async with self._db.transaction() as session:
            volumes = await VolumeRepository(session).list(owner_id)
        if refresh_usage:
            volumes = [await self._refresh(volume) for volume in volumes]
        in_use = await self._in_use(owner_id)
        return [(volume, volume.id in in_use) for volume in volumes]

    async def get(self, owner_id: int, volume_id: str, refresh_usage: bool = False) -> tuple[Volume, bool]:
        volume = await self._volume(owner_id, volume_id)
        if refresh_usage:
            volume = await self._refresh(volume)
        return volume, volume.id in await self._in_use(owner_id)

    async def update(self, owner_id: int, volume_id: str, request: VolumeUpdateRequest) -> tuple[Volume, bool]:
        """Rename, grow (online through the VM that mounts it rw, or offline),
        or shrink (offline only, never below what it holds: 409)."""
        problems: builtins.list[FieldProblem] = []
        _check_name(problems, request.name, required=False)
        if request.quota_bytes is not None:
            self._check_size(problems, request.quota_bytes)
        if problems:
            raise InvalidRequest(problems)
        volume = await self._volume(owner_id, volume_id)
        if request.quota_bytes is not None and request.quota_bytes != volume.quota_bytes:
            async with self._quota_locks[owner_id]:
                if request.quota_bytes > volume.quota_bytes:
                    await self._check_quota(owner_id, request.quota_bytes - volume.quota_bytes)
                with volume_errors("quota_bytes"):
                    info = await self.host.volumes.resize(volume_id, request.quota_bytes)
                await self._store_fields(volume_id, quota_bytes=request.quota_bytes, used_bytes=info.used_bytes)
        if request.name is not None:
            await self._store_fields(volume_id, name=request.name)
        return await self.get(owner_id, volume_id)

    async def delete(self, owner_id: int, volume_id: str) -> None:
        """Remove the volume and its checkpoints (409 while any VM mounts it).
        Snapshots saved with it mounted keep their record; restoring one then
        says the volume is gone."""
        async with self._db.transaction() as session:
            volumes = VolumeRepository(session)
            volume = await volumes.lock(owner_id, volume_id)
            if volume is None:
                raise NotFound(f"volume {volume_id} not found")
            held = await MountRepository(session).of_volume(owner_id, volume_id, HOLDING_STATES)
            if held:
                where = ", ".join(f"{m.vm_id} at {m.mount_path}" for m in held)
                raise Conflict(f"volume {volume_id} is mounted ({where}); unmount it first")
            try:
                with volume_errors():
                    await self.host.volumes.delete(volume_id)
            except NotFound:
                log.warning("volume %s had no files on this host any more", volume_id)
            await volumes.delete(volume)

    # -- checkpoints -----------------------------------------------------------------

    async def create_checkpoint(
        self, owner_id: int, volume_id: str, request: CheckpointCreateRequest
    ) -> VolumeCheckpoint:
        """The volume as it is now (a VM that mounts it rw has its filesystem
        frozen meanwhile), copy-on-write."""
        problems: builtins.list[FieldProblem] = []
        _check_name(problems, request.name, required=False)
        if problems:
            raise InvalidRequest(problems)
        await self._volume(owner_id, volume_id)
        checkpoint_id = new_checkpoint_id()
        with volume_errors():
            info = await self.host.volumes.create_checkpoint(volume_id, checkpoint_id)
        async with self._db.transaction() as session:
            return await CheckpointRepository(session).add(
                VolumeCheckpoint(
                    id=checkpoint_id,
                    volume_id=volume_id,
                    owner_id=owner_id,
                    name=request.name,
                    size_bytes=info.size_bytes,
                )
            )

    async def list_checkpoints(self, owner_id: int, volume_id: str) -> builtins.list[VolumeCheckpoint]:
        await self._volume(owner_id, volume_id)
        async with self._db.transaction() as session:
            return await CheckpointRepository(session).list(owner_id, volume_id)

    async def delete_checkpoint(self, owner_id: int, volume_id: str, checkpoint_id: str) -> None:
        """409 while a VM mounts it; its space comes back once no VM has the volume."""
        async with self._db.transaction() as session:
            if await VolumeRepository(session).lock(owner_id, volume_id) is None:
                raise NotFound(f"volume {volume_id} not found")
            checkpoints = CheckpointRepository(session)
            checkpoint = await checkpoints.get(owner_id, volume_id, checkpoint_id)
            if checkpoint is None:
                raise NotFound(f"volume {volume_id} has no checkpoint {checkpoint_id}")
            held = [
                m for m in await MountRepository(session).of_volume(owner_id, volume_id, HOLDING_STATES)
                if m.checkpoint_id == checkpoint_id
            ]  # fmt: skip
            if held:
                raise Conflict(f"checkpoint {checkpoint_id} is mounted in {held[0].vm_id} at {held[0].mount_path}")
            try:
                with volume_errors():
                    await self.host.volumes.delete_checkpoint(volume_id, checkpoint_id)
            except NotFound:
                log.warning("checkpoint %s of volume %s was gone from the host", checkpoint_id, volume_id)
            await checkpoints.delete(checkpoint)

    # -- at start --------------------------------------------------------------------

    async def start(self) -> None:
        """Settle the host's volumes with the records: what a dead process left
        half done is finished or undone; files without a row (a create a crash
        cut short) go; so do checkpoints no row and no snapshot accounts for."""
        host = self._node.volumes
        if host is None:
            return
        await host.start()
        async with self._db.transaction() as session:
            known = await VolumeRepository(session).ids_any_owner()
            snapshots = {
                s.id for s in await SnapshotRepository(session).list_any_owner()
                if s.status != SnapshotStatus.FAILED
            }  # fmt: skip
        root = self._settings.volumes_dir
        for directory in sorted(root.iterdir()) if root.is_dir() else []:
            if not directory.is_dir() or directory.name.startswith(".") or directory.name in known:
                continue
            log.warning("removing volume %s: it has no record (a create a crash cut short)", directory.name)
            try:
                await host.volumes.delete(directory.name)
            except VolumeNotFound:
                shutil.rmtree(directory, ignore_errors=True)
            except VolumeError as error:
                log.warning("volume %s stays: %s", directory.name, error)
        for volume_id in sorted(known):
            async with self._db.transaction() as session:
                rows = await CheckpointRepository(session).ids_any_owner(volume_id)
            try:
                for checkpoint in await host.volumes.checkpoints(volume_id):
                    if checkpoint.checkpoint_id not in rows and checkpoint.checkpoint_id not in snapshots:
                        log.info("volume %s: removing checkpoint %s, which nothing refers to",
                                 volume_id, checkpoint.checkpoint_id)  # fmt: skip
                        await host.volumes.delete_checkpoint(volume_id, checkpoint.checkpoint_id)
            except VolumeError as error:
                log.warning("volume %s: its checkpoints were not settled: %s", volume_id, error)

    # -- internals -------------------------------------------------------------------

    def _check_size(self, problems: builtins.list[FieldProblem], quota_bytes: int) -> None:
        low, high = self._settings.volume_min_bytes, self._settings.volume_max_bytes
        if not low <= quota_bytes <= high:
            problems.append(FieldProblem(("quota_bytes",), f"must be between {low} and {high} bytes"))

    def disk_quota_bytes(self) -> int:
        if self._settings.quota_disk_mb is not None:
            return self._settings.quota_disk_mb * MiB
        self._settings.data_dir.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self._settings.data_dir).total

    async def _check_quota(self, owner_id: int, more_bytes: int) -> None:
        async with self._db.transaction() as session:
            used = await VolumeRepository(session).disk_bytes(owner_id)
        limit = self.disk_quota_bytes()
        if used + more_bytes > limit:
            raise QuotaExceeded(
                f"quota disk_mb: {more_bytes // MiB} MB more asked, {max(limit - used, 0) // MiB} MB left "
                f"of {limit // MiB} (volumes' quota_bytes and snapshots count; KILN_QUOTA_DISK_MB)"
            )

    async def _volume(self, owner_id: int, volume_id: str) -> Volume:
        async with self._db.transaction() as session:
            volume = await VolumeRepository(session).get(owner_id, volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} not found")
        return volume

    async def _in_use(self, owner_id: int) -> set[str]:
        async with self._db.transaction() as session:
            return await MountRepository(session).volumes_in_use(owner_id, HOLDING_STATES)

    async def _refresh(self, volume: Volume) -> Volume:
        with volume_errors():
            info = await self.host.volumes.refresh_usage(volume.id)
        await self._store_fields(volume.id, used_bytes=info.used_bytes)
        volume.used_bytes = info.used_bytes
        return volume

    async def _store_fields(self, volume_id: str, **fields: object) -> None:
        async with self._db.transaction() as session:
            await VolumeRepository(session).update_any_owner(volume_id, **fields)
