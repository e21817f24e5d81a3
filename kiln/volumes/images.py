"""Volume images while no VM has them: create, check, resize, measure, delete.

Callers hold the volume's lock and have made sure that no attachment has the
image open (``Volumes`` does both); everything here then owns the files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time

from kiln.volumes import tools
from kiln.volumes.errors import (
    InvalidVolumeRequest,
    VolumeDamaged,
    VolumeError,
    VolumeExists,
    VolumeTooSmall,
)
from kiln.volumes.layout import (
    VolumeMeta,
    VolumePaths,
    new_layer_id,
    top_path,
    write_meta,
)
from kiln.volumes.rawview import raw_view
from kiln.volumes.tools import Identity

log = logging.getLogger(__name__)

# ext4 blocks are 4 KiB: a volume's size is a whole number of them, rounded
# down, so the filesystem never holds more than the quota.
BLOCK_BYTES = 4096


def image_size(quota_bytes: int, minimum: int, maximum: int) -> int:
    if quota_bytes < minimum:
        raise InvalidVolumeRequest(
            f"a volume needs at least {minimum} bytes (asked: {quota_bytes})"
        )
    if quota_bytes > maximum:
        raise InvalidVolumeRequest(
            f"a volume may have at most {maximum} bytes (asked: {quota_bytes})"
        )
    return quota_bytes - quota_bytes % BLOCK_BYTES


async def create(paths: VolumePaths, size_bytes: int, identity: Identity) -> VolumeMeta:
    """An empty ext4 of ``size_bytes`` as the first top, made in a raw sparse
    file first (mkfs.ext4 writes raw) and converted (holes stay holes)."""
    try:
        paths.root.mkdir(mode=0o700)
    except FileExistsError:
        raise VolumeExists(f"volume {paths.volume_id} exists already") from None
    try:
        raw = paths.root / ".new.raw"
        with raw.open("wb") as file:
            file.truncate(size_bytes)
        await tools.make_ext4(raw)
        # Our own fresh image: nothing hostile in it yet, root may read it.
        empty = tools.parse_superblock(
            (await tools.run("dumpe2fs", "-h", str(raw))).stdout
        )
        for directory in (paths.layers, paths.scratch_dir, paths.attachments):
            directory.mkdir(mode=0o700)
        top = new_layer_id()
        await tools.convert_raw_to_qcow2(raw, paths.layer(top))
        raw.unlink()
        meta = VolumeMeta(
            volume_id=paths.volume_id,
            size_bytes=size_bytes,
            created_at=time.time(),
            top=top,
            used_bytes=0,
            used_at=time.time(),
            overhead_bytes=empty.used_bytes,
        )
        write_meta(paths, meta)
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)
        raise
    log.info("volume %s created (%d bytes)", paths.volume_id, size_bytes)
    return meta


def delete(paths: VolumePaths) -> None:
    # The layers are read-only files in writable directories: rmtree needs no chmod.
    shutil.rmtree(paths.root)


async def check(
    paths: VolumePaths, meta: VolumeMeta, identity: Identity
) -> tools.FsckOutcome:
    """After a VM died with the volume mounted rw: reclaim qcow2 clusters the
    killed QEMU leaked, then replay the journal and repair (e2fsck -p, else -fy)."""
    top = top_path(paths, meta)
    await tools.repair_leaks(top)
    async with raw_view(paths, top, writable=True, owner=identity) as view:
        outcome = await tools.check_ext4(view.device, identity, view.pass_fds)
        superblock = await tools.read_superblock(view.device, identity, view.pass_fds)
    if outcome.returncode & 4 or outcome.returncode >= 8:
        raise VolumeDamaged(
            f"volume {paths.volume_id} has filesystem damage e2fsck could not repair "
            f"(exit {outcome.returncode}): {outcome.output.strip()[-1500:]}"
        )
    meta.needs_check = False
    meta.used_bytes = max(0, superblock.used_bytes - meta.overhead_bytes)
    meta.used_at = time.time()
    write_meta(paths, meta)
    if outcome.repaired:
        log.warning(
            "volume %s: e2fsck repaired: %s",
            paths.volume_id,
            outcome.output.strip()[-500:],
        )
    return outcome


async def measure(paths: VolumePaths, meta: VolumeMeta, identity: Identity) -> int:
    """Used bytes from the filesystem's own counters, as the guest's statfs
    would count them (the overhead measured at creation taken off)."""
    async with raw_view(
        paths, top_path(paths, meta), writable=False, owner=identity
    ) as view:
        superblock = await tools.read_superblock(view.device, identity, view.pass_fds)
    meta.used_bytes = max(0, superblock.used_bytes - meta.overhead_bytes)
    meta.used_at = time.time()
    write_meta(paths, meta)
    return meta.used_bytes


async def resize(
    paths: VolumePaths, meta: VolumeMeta, size_bytes: int, identity: Identity
) -> None:
    """Grow (image, then filesystem) or shrink (filesystem, then image) offline.
    A shrink below what the filesystem holds is refused and changes nothing."""
    if size_bytes == meta.size_bytes:
        return
    growing = size_bytes > meta.size_bytes
    top = top_path(paths, meta)
    if not growing and size_bytes < meta.used_bytes + meta.overhead_bytes:
        raise VolumeTooSmall(
            f"volume {paths.volume_id} holds {meta.used_bytes} bytes; it cannot shrink to {size_bytes}"
        )
    if growing:
        await tools.resize_qcow2(top, size_bytes)
    async with raw_view(paths, top, writable=True, owner=identity) as view:
        result = await tools.resize_ext4(
            view.device, size_bytes, identity, view.pass_fds
        )
        if result.returncode != 0:
            if growing:
                with contextlib.suppress(VolumeError):
                    await tools.resize_qcow2(top, meta.size_bytes, shrink=True)
                raise VolumeError(
                    f"cannot grow volume {paths.volume_id}: {result.describe()}"
                )
            raise VolumeTooSmall(
                f"volume {paths.volume_id} cannot shrink to {size_bytes}: {result.describe()}"
            )
        superblock = await tools.read_superblock(view.device, identity, view.pass_fds)
    if not growing:
        await tools.resize_qcow2(top, size_bytes, shrink=True)
    # The data did not change, the metadata did (inode tables of new groups).
    meta.overhead_bytes = max(0, superblock.used_bytes - meta.used_bytes)
    meta.size_bytes = size_bytes
    write_meta(paths, meta)
